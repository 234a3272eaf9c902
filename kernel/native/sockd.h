/*
 * sockd: the socket maker of a sliver (F38), included by sliver-init.c.
 *
 * Why: a sliver lives in a network namespace of its own, so every /proc/<pid>/net
 * (and /proc/net, /proc/self/net, /proc/<pid>/task/<tid>/net) it can name shows that
 * namespace's tables, which hold none of the node's sockets. Its IP and netlink
 * sockets must still live in the node's namespace (slivers share the node's addresses
 * and port table): socket(2) of AF_INET, AF_INET6 and AF_NETLINK in a sliver is a
 * seccomp user notification (`sockd_filter`) answered by this process, which makes the
 * socket in the node's namespace and puts it into the caller's fd table
 * (SECCOMP_IOCTL_NOTIF_ADDFD with SECCOMP_ADDFD_FLAG_SEND: atomic, the caller's own
 * RLIMIT_NOFILE applies). AF_UNIX sockets stay in the sliver's namespace (Landlock's
 * abstract-socket scoping compares the creators' domains, which the sliver's own
 * sockets must share), and every other family is refused by the guard filter first
 * (ERRNO outranks USER_NOTIF).
 *
 * Where it runs: forked by the launcher once it is root of the sliver's user namespace
 * and in the sliver's cgroups, before it unshares the PID and network namespaces. So
 * it is in the node's network namespace, charged to the slice (cgroups: memory, pids,
 * the INET socket cap of F33, net_cls), and not in the sliver's PID namespace: no
 * process of the sliver can name it (signals, /proc/<pid>/net, ptrace).
 *
 * Identity: each socket is made with the caller's fsuid/fsgid (the uid the kernel
 * records for it, which the agent reads to tell a slice's socket from the host's),
 * egid and groups (ping_group_range), read from /proc/<pid>/status (ids as seen from
 * the sliver's user namespace, ours) and checked with SECCOMP_IOCTL_NOTIF_ID_VALID
 * after the read. It keeps CAP_SETUID and CAP_SETGID of the sliver's user namespace
 * only (none over the node's network namespace).
 *
 * Netlink port ids (F43): in a guarded sliver every netlink socket is bound here,
 * at birth, to a port id the kernel picks (autobind: a random negative id, since a
 * socket of our own holds our tgid, the id it would try first). A sliver therefore never picks the port
 * id of a socket in the node's namespace: not by bind(2) with an explicit nl_pid
 * (the guard keeps the id the socket has, agent/guard/supervisor.py), and not by the
 * kernel's autobind at its first send or connect, which would take the caller's tgid
 * in the sliver's PID namespace, a number a sliver chooses by forking. Otherwise a
 * sliver could squat the ids that processes of the node bind explicitly (libnl's
 * and pyroute2's pid + (n << 22), the agent's among them) and make their bind fail.
 * Without a guard nobody rewrites the sliver's bind(2), and the kernel refuses a
 * second bind naming another id (`ip` binds nl_pid 0: EINVAL), so the socket is
 * left unbound; such a sliver has no port table either.
 *
 * It exits when the listener hangs up (no process of the sliver is left) or when the
 * init goes away before handing it the listener. Its setup (fds, cwd, capabilities)
 * ends with a word to the launcher on its channel: "ok", or why it failed (then it
 * exits with that step's SOCKD_EXIT_* code); the launcher waits for it, so a sockd
 * that cannot serve fails the create with its reason instead of leaving a sliver
 * whose socket() calls have nobody to answer them.
 */
#include <linux/audit.h>
#include <linux/capability.h>
#include <linux/netlink.h>
#include <sys/fsuid.h>

/* Missing from Debian 12's headers (KERNEL-FACTS); the flag goes by value. */
#define SECCOMP_IOCTL_NOTIF_SET_FLAGS_ 0x40082104
#define SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP_ 1UL

/* The filter the init installs after the guard's: socket() of the three families
 * above is notified, everything else allowed (the guard filter decides the rest). */
static const struct sock_filter sockd_insns[] = {
	BPF_STMT(BPF_LD | BPF_W | BPF_ABS, 4),                       /* arch */
	BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 0, 6),
	BPF_STMT(BPF_LD | BPF_W | BPF_ABS, 0),                       /* nr */
	BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_socket, 0, 4),
	BPF_STMT(BPF_LD | BPF_W | BPF_ABS, 16),                      /* args[0], low word */
	BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AF_INET, 3, 0),
	BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AF_INET6, 2, 0),
	BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AF_NETLINK, 1, 0),
	BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
};

/* Send `fd` to sockd over `chan` with a one-byte tag: 'S' its own listener (it
 * receives the notifications), 'G' a copy of the guard's (the agent receives them
 * and forwards socket() ones over the request socket). Closes `chan`. */
static void sockd_send(int chan, char tag, int fd)
{
	struct iovec iov = { .iov_base = &tag, .iov_len = 1 };
	union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int))]; } cm;
	memset(&cm, 0, sizeof cm);
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1,
			     .msg_control = cm.buf, .msg_controllen = sizeof cm.buf };
	struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(c), &fd, sizeof(int));
	if (sendmsg(chan, &mh, MSG_NOSIGNAL) != 1)   /* it started (it said so): killed */
		die("send sockd its listener (sockd gone since it started)", errno);
	close(chan);
}

/* Without a guard: install sockd's filter with a listener and hand it over. */
static void sockd_install(int chan)
{
	struct sock_fprog prog = { .len = sizeof sockd_insns / sizeof sockd_insns[0],
				   .filter = (struct sock_filter *)sockd_insns };
	int lis = (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER,
			       SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);
	if (lis < 0)
		die("install socket filter", errno);
	sockd_send(chan, 'S', lis);
	close(lis);
}

/* Exit codes, one per reason (the launcher reports them; the host reaps later ones). */
enum {
	SOCKD_EXIT_DONE = 0,      /* the sliver is gone, or the init failed before its filters */
	SOCKD_EXIT_FDS = 10,      /* could not move its two sockets out of the way */
	SOCKD_EXIT_CHDIR = 11,
	SOCKD_EXIT_CAPS = 12,     /* could not drop to CAP_SETUID and CAP_SETGID */
	SOCKD_EXIT_IDENTITY = 13, /* could not get back to root after making a socket */
	SOCKD_EXIT_POLL = 14,
};

/* Setup failed: tell the launcher why over `chan`, exit with `code`. */
static void __attribute__((noreturn)) sockd_fail(int chan, int code, const char *what, int err)
{
	char buf[160];
	int n = snprintf(buf, sizeof buf, "%s: %s", what, strerror(err));
	if (n > 0)
		(void)send(chan, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1,
			   MSG_NOSIGNAL | MSG_DONTWAIT);
	_exit(code);
}

/* In the launcher: wait for sockd's word on `chan` (see the top of this file).
 * Dies with sockd's reason, or its exit status if it left without one. */
static void sockd_started(int chan, pid_t sockd)
{
	char buf[200], step[320];
	ssize_t n;
	do
		n = recv(chan, buf, sizeof buf - 1, 0);
	while (n < 0 && errno == EINTR);
	if (n == 2 && memcmp(buf, "ok", 2) == 0)
		return;
	int err = n < 0 ? errno : EPIPE, status = 0;
	buf[n > 0 ? n : 0] = 0;
	pid_t w;
	do
		w = waitpid(sockd, &status, 0);
	while (w < 0 && errno == EINTR);
	if (w == sockd && WIFSIGNALED(status))
		snprintf(step, sizeof step, "start sockd (killed by signal %d)", WTERMSIG(status));
	else if (w == sockd && WIFEXITED(status))
		snprintf(step, sizeof step, "start sockd (exit %d%s%s)", WEXITSTATUS(status),
			 n > 0 ? ": " : "", buf);
	else
		snprintf(step, sizeof step, "start sockd (%s)", n > 0 ? buf : "no word");
	die(step, err);
}

struct sockd_ids {
	unsigned egid, fsuid, fsgid;
	gid_t groups[MAX_GROUPS];
	int ngroups;
};

/* Parse "Uid:\tr e s fs" style lines of /proc/<pid>/status. 0 or -1. */
static int sockd_read_ids(pid_t pid, struct sockd_ids *ids)
{
	char path[64], buf[4096];
	snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, buf, sizeof buf - 1);
	close(fd);
	if (n <= 0)
		return -1;
	buf[n] = 0;
	unsigned r, e, s, f;
	char *p = strstr(buf, "\nUid:");
	if (!p || sscanf(p + 5, "%u %u %u %u", &r, &e, &s, &f) != 4)
		return -1;
	ids->fsuid = f;
	p = strstr(buf, "\nGid:");
	if (!p || sscanf(p + 5, "%u %u %u %u", &r, &e, &s, &f) != 4)
		return -1;
	ids->egid = e;
	ids->fsgid = f;
	ids->ngroups = 0;
	p = strstr(buf, "\nGroups:");
	if (!p)
		return -1;
	p += 8;
	while (*p && *p != '\n' && ids->ngroups < MAX_GROUPS) {
		char *end;
		unsigned long g = strtoul(p, &end, 10);
		if (end == p)
			break;
		ids->groups[ids->ngroups++] = (gid_t)g;
		p = end;
	}
	return 0;
}

/* Make socket(domain, type, protocol) as the caller would have, or -errno. */
static int sockd_socket(const struct sockd_ids *ids, int domain, int type, int protocol)
{
	int fd = -1, err = EPERM;
	if (setgroups((size_t)ids->ngroups, ids->groups) == 0 &&
	    syscall(SYS_setresgid, -1, ids->egid, -1) == 0) {
		setfsgid(ids->fsgid);
		setfsuid(ids->fsuid);
		fd = socket(domain, type | SOCK_CLOEXEC, protocol);
		err = fd < 0 ? errno : 0;
	}
	/* Back to our own identity whatever happened (a half-taken one included). */
	setfsuid(0);
	setfsgid(0);
	if (syscall(SYS_setresgid, -1, 0, -1) < 0 || setgroups(0, NULL) < 0)
		_exit(SOCKD_EXIT_IDENTITY);   /* cannot get back to a known identity: stop serving */
	/* Each id change above reset "dumpable" to fs.suid_dumpable (F42). */
	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
		_exit(SOCKD_EXIT_IDENTITY);
	return fd < 0 ? -err : fd;
}

static void sockd_answer(int lis, uint64_t id, int error)
{
	struct seccomp_notif_resp resp = { .id = id, .error = -error };
	(void)ioctl(lis, SECCOMP_IOCTL_NOTIF_SEND, &resp);  /* ENOENT: the caller left */
}

/* Keep CAP_SETUID and CAP_SETGID (of our user namespace) and nothing else. 0 or -1. */
static int sockd_drop_caps(void)
{
	for (int c = 0; c <= CAP_LAST_CAP; c++)
		if (c != CAP_SETUID && c != CAP_SETGID)
			prctl(PR_CAPBSET_DROP, c, 0, 0, 0);
	struct __user_cap_header_struct h = { .version = _LINUX_CAPABILITY_VERSION_3 };
	struct __user_cap_data_struct d[2];
	memset(d, 0, sizeof d);
	d[0].effective = d[0].permitted = (1u << CAP_SETUID) | (1u << CAP_SETGID);
	if (syscall(SYS_capset, &h, d) < 0)
		return -1;
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		return -1;
	return prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);   /* F42; see sockd_socket */
}

/* One socket() notification: make the socket as the caller, answer with it. With
 * `guarded` (the agent decides the sliver's binds) a netlink socket is bound first. */
static void sockd_handle(int lis, const struct seccomp_notif *req, int guarded)
{
	const struct seccomp_data *d = &req->data;
	int domain = (int)d->args[0], type = (int)d->args[1], proto = (int)d->args[2];
	if (d->arch != AUDIT_ARCH_X86_64 || d->nr != SYS_socket ||
	    (domain != AF_INET && domain != AF_INET6 && domain != AF_NETLINK)) {
		sockd_answer(lis, req->id, EPERM);   /* not what the filters send */
		return;
	}
	struct sockd_ids ids;
	if (sockd_read_ids((pid_t)req->pid, &ids) < 0 ||
	    ioctl(lis, SECCOMP_IOCTL_NOTIF_ID_VALID, &req->id) < 0) {
		sockd_answer(lis, req->id, ESRCH);
		return;
	}
	int fd = sockd_socket(&ids, domain, type, proto);
	if (fd < 0) {
		sockd_answer(lis, req->id, -fd);
		return;
	}
	if (guarded && domain == AF_NETLINK) {   /* a port id the kernel picks; see the top */
		struct sockaddr_nl nl = { .nl_family = AF_NETLINK };
		if (bind(fd, (struct sockaddr *)&nl, sizeof nl) < 0) {
			sockd_answer(lis, req->id, errno);
			close(fd);
			return;
		}
	}
	struct seccomp_notif_addfd add = {
		.id = req->id, .flags = SECCOMP_ADDFD_FLAG_SEND, .srcfd = (uint32_t)fd,
		.newfd = 0, .newfd_flags = (type & SOCK_CLOEXEC) ? O_CLOEXEC : 0,
	};
	if (ioctl(lis, SECCOMP_IOCTL_NOTIF_ADDFD, &add) < 0 && errno != ENOENT)
		sockd_answer(lis, req->id, errno);   /* EMFILE: the caller's own limit */
	close(fd);
}

static void __attribute__((noreturn)) sockd_serve(int chan, int reqs)
{
	/* Nothing of the launcher's but the two sockets, a cwd outside the sliver. The
	 * launcher keeps its caller's fd numbers (the sync socket, the guard filter pipe
	 * can be anywhere, 65 included): the two go at the lowest free numbers from 64,
	 * wherever those are, and everything else is closed around them. (They once had
	 * to land on 64 and 65 exactly, and sockd left silently when 65 was taken.) */
	int keep = fcntl(chan, F_DUPFD_CLOEXEC, 64);
	if (keep < 0)
		sockd_fail(chan, SOCKD_EXIT_FDS, "keep its channel", errno);
	int keepr = fcntl(reqs, F_DUPFD_CLOEXEC, keep + 1);
	if (keepr < 0)
		sockd_fail(chan, SOCKD_EXIT_FDS, "keep its request socket", errno);
	syscall(SYS_close_range, 0U, (unsigned)keep - 1, 0);
	if (keepr > keep + 1)
		syscall(SYS_close_range, (unsigned)keep + 1, (unsigned)keepr - 1, 0);
	syscall(SYS_close_range, (unsigned)keepr + 1, ~0U, 0);
	chan = keep;
	reqs = keepr;
	if (chdir("/") < 0)
		sockd_fail(chan, SOCKD_EXIT_CHDIR, "chdir /", errno);
	prctl(PR_SET_NAME, "sliver-sockd", 0, 0, 0);
	if (sockd_drop_caps() < 0)
		sockd_fail(chan, SOCKD_EXIT_CAPS, "drop capabilities", errno);
	if (send(chan, "ok", 2, MSG_NOSIGNAL) != 2)
		_exit(SOCKD_EXIT_DONE);   /* the launcher is gone: so is the create */
	/* The listener, sent by the init once its filters are in. */
	char tag = 0;
	int lis = -1;
	struct iovec iov = { .iov_base = &tag, .iov_len = 1 };
	union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int))]; } cm;
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1,
			     .msg_control = cm.buf, .msg_controllen = sizeof cm.buf };
	ssize_t n;
	do
		n = recvmsg(chan, &mh, MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	struct cmsghdr *h = CMSG_FIRSTHDR(&mh);
	if (n == 1 && h && h->cmsg_level == SOL_SOCKET && h->cmsg_type == SCM_RIGHTS &&
	    h->cmsg_len == CMSG_LEN(sizeof(int)))
		memcpy(&lis, CMSG_DATA(h), sizeof lis);
	close(chan);
	if (lis < 0 || (tag != 'S' && tag != 'G'))
		_exit(SOCKD_EXIT_DONE);   /* the init failed before its filters */
	const int own = tag == 'S';
	if (own)
		close(reqs);   /* no agent in between */
	else {
		/* Our own pid is the id the kernel's autobind tries first: take it with a
		 * socket of ours, kept, so that every socket bound for the sliver gets a
		 * random id and none tells it a pid of the node. (If this fails, the first
		 * socket gets that id: nothing worse.) */
		int hold = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
		struct sockaddr_nl nl = { .nl_family = AF_NETLINK };
		if (hold >= 0 && bind(hold, (struct sockaddr *)&nl, sizeof nl) < 0)
			close(hold);
	}
	/* Wake the caller on the CPU it waits on (KERNEL-FACTS: 43 -> 5 us). */
	if (own)
		(void)ioctl(lis, SECCOMP_IOCTL_NOTIF_SET_FLAGS_, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP_);
	for (;;) {
		struct pollfd p[2] = { { .fd = lis, .events = own ? POLLIN : 0 },
				       { .fd = own ? -1 : reqs, .events = POLLIN } };
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			_exit(SOCKD_EXIT_POLL);
		}
		if (p[0].revents & (POLLHUP | POLLERR | POLLNVAL))
			_exit(SOCKD_EXIT_DONE);   /* no process of the sliver is left */
		struct seccomp_notif req;
		memset(&req, 0, sizeof req);
		if (own && (p[0].revents & POLLIN)) {
			if (ioctl(lis, SECCOMP_IOCTL_NOTIF_RECV, &req) == 0)
				sockd_handle(lis, &req, 0);   /* else ENOENT: the caller left */
		}
		if (!own && (p[1].revents & POLLIN)) {
			/* The agent forwards the notification it received, as is. */
			ssize_t got = recv(reqs, &req, sizeof req, MSG_DONTWAIT);
			if (got == (ssize_t)sizeof req)
				sockd_handle(lis, &req, 1);
		}
		/* Every end of the request socket is gone (the init's copy at SOCKD_FD
		 * too): the sliver is gone. */
		if (!own && (p[1].revents & POLLHUP))
			_exit(SOCKD_EXIT_DONE);
	}
}
