/* attacker: what a hostile process inside a sliver tries, one subcommand per attack.
 * Built static by tests/e2e/test_attacks.py and copied into the sliver's root.
 * Each prints one line "NAME VALUE..." (errno 0 = the call succeeded) and exits 0
 * unless its arguments are bad (2).
 *
 *   read PATH                 open+read PATH                -> "read ERRNO"
 *   handle PATH               name_to_handle_at + open_by_handle_at on "/"
 *                                                           -> "handle E_NAME E_OPEN"
 *   chroot MARKER             chroot("/tmp/jail"), chdir("..") x64, chroot("."), open
 *                             MARKER; also whether "/" is still the sliver's root
 *                                                           -> "chroot E_CHROOT E_MARKER SAMEROOT"
 *   abstract NAME             connect to abstract Unix NAME -> "abstract ERRNO"
 *   alisten NAME SECS         listen on abstract Unix NAME for SECS -> "alisten ERRNO"
 *   socket FAM TYPE PROTO     socket(...) numbers           -> "socket ERRNO"
 *   uring                     io_uring_setup                -> "uring ERRNO"
 *   x32                       getpid with the x32 bit; i386 getpid by int $0x80
 *                                                           -> "x32 RET i386 RET"
 *   mknod PATH                mknod a block device          -> "mknod ERRNO"
 *   ptrace PID                PTRACE_ATTACH                 -> "ptrace ERRNO"
 *   shm KEY                   shmget(KEY, 0, 0)             -> "shm ERRNO"
 *   killall                   kill(-1, SIGKILL)             -> "killall ERRNO"
 *   bpf                       bpf(BPF_MAP_CREATE) of an array -> "bpf ERRNO"
 *   perf                      perf_event_open, all processes on cpu 0 -> "perf ERRNO"
 *   sockfill N SECS           fill N Unix socketpairs' buffers, hold SECS -> "sockfill BYTES"
 *   stealfd PID FD [DELAY]    pidfd_getfd of another process's fd, then TIOCSTI and (after
 *                             DELAY seconds, waiting at most 2 s for data) read
 *                                                           -> "stealfd E_GETFD E_TIOCSTI DATA"
 *   seccomp                   install an own filter answering bind by user notification,
 *                             with a listener of its own -> "seccomp ERRNO"
 *   badbinds PORT             hostile bind arguments (bad fd, not a socket, NULL, unmapped
 *                             or huge sockaddr, family mismatch, short length)
 *                                                           -> "badbinds E1 E2 ... E8"
 *   subvol DIR NAME           BTRFS_IOC_SUBVOL_CREATE in DIR (a subvolume has its own
 *                             quota group: it would escape the disk limit) -> "subvol ERRNO"
 *   sniffers PATH N SECS      N x OpenSniffer on the agent socket, keeping every socket it
 *                             sends, held SECS          -> "sniffers GOT"
 *   sniff1 PATH SECS M1 M2    one OpenSniffer; prints "sniff1 ready" once it has the socket,
 *                             then reads it for SECS    -> "sniff1 WITH_M1 WITH_M2 TOTAL"
 *   udpflood PORT SECS        UDP datagrams to 127.0.0.1:PORT as fast as it can -> "udpflood SENT"
 *   threadbinds PORT N        N threads, one after another, each binding 127.0.0.1:PORT once
 *                                                           -> "threadbinds N"
 *   race ADDR OK BAD N        bind N times while a thread flips the sockaddr's port
 *                             between OK and BAD            -> "race N BOUND_OK BOUND_OTHER FAILED"
 *   bind ADDR PORT [v6only0]  bind tcp                       -> "bind ERRNO PORT"
 *   bindp TYPE PROTO ADDR PORT [freebind]
 *                             bind a socket of that type and protocol -> "bind ERRNO PORT"
 *   hold PATH N SECS          N connections to Unix PATH, held SECS -> "hold CONNECTED"
 *   udphold ADDR PORT SECS [MSG]  bind UDP ADDR:PORT (IPv4) -> "udphold ERRNO"; then for
 *                             SECS print "msg PAYLOAD" per datagram received, and send MSG
 *                             to itself every 100 ms if given -> "udphold done"
 *   junkfds PATH N            N times: connect, send 200 fds + junk bytes, close
 *                                                           -> "junkfds SENT"
 *   slow PATH SECS            send a request one byte a second -> "slow CLOSED_AFTER_S"
 *   call PATH                 stdin -> PATH -> stdout (one HTTP request)
 *   mlisten ADDR PORT SECS    an MPTCP listener on ADDR:PORT (IPv4) -> "mlisten ERRNO"; accepts
 *                             one connection -> "accepted ERRNO", holds it SECS
 *   mconnect ADDR PORT SECS   an MPTCP connection to ADDR:PORT -> "mconnect ERRNO LOCALPORT",
 *                             held SECS
 *   nlsquat ID SECS           NETLINK_ROUTE port ids: a new socket's, one bound with the
 *                             explicit nl_pid ID, one bound with ID and a multicast group,
 *                             and one autobound by its first send; held SECS
 *                             -> "nlsquat NEW E_BIND BOUND E_GROUP GROUPED SENT MYPID"
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/filter.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static int err(long r) { return r < 0 ? errno : 0; }

static int unix_connect(const char *path, int abstract)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	socklen_t len;
	int s = socket(AF_UNIX, SOCK_STREAM, 0);
	if (s < 0)
		return -1;
	if (abstract) {
		strncpy(sa.sun_path + 1, path, sizeof sa.sun_path - 2);
		len = offsetof(struct sockaddr_un, sun_path) + 1 + strlen(path);
	} else {
		strncpy(sa.sun_path, path, sizeof sa.sun_path - 1);
		len = sizeof sa;
	}
	if (connect(s, (struct sockaddr *)&sa, len) < 0) {
		int e = errno;
		close(s);
		errno = e;
		return -1;
	}
	return s;
}

static int ipv4(const char *addr, int port, struct sockaddr_in *sa)
{
	memset(sa, 0, sizeof *sa);
	sa->sin_family = AF_INET;
	sa->sin_port = htons((uint16_t)port);
	return inet_pton(AF_INET, addr, &sa->sin_addr) == 1 ? 0 : -1;
}

/* MPTCP (IPPROTO_MPTCP): its subflows are TCP sockets the kernel makes. */
static void do_mptcp(int listening, const char *addr, int port, unsigned secs)
{
	struct sockaddr_in sa;
	if (ipv4(addr, port, &sa) < 0) {
		printf("%s %d\n", listening ? "mlisten" : "mconnect", EINVAL);
		return;
	}
	int s = socket(AF_INET, SOCK_STREAM, 262);
	if (s < 0) {
		printf("%s %d\n", listening ? "mlisten" : "mconnect", errno);
		return;
	}
	if (listening) {
		int e = err(bind(s, (struct sockaddr *)&sa, sizeof sa));
		if (!e)
			e = err(listen(s, 4));
		printf("mlisten %d\n", e);
		if (e)
			return;
		int c = accept(s, NULL, NULL);
		printf("accepted %d\n", c < 0 ? errno : 0);
	} else {
		int e = err(connect(s, (struct sockaddr *)&sa, sizeof sa));
		socklen_t len = sizeof sa;
		getsockname(s, (struct sockaddr *)&sa, &len);
		printf("mconnect %d %d\n", e, ntohs(sa.sin_port));
	}
	sleep(secs);
}

static unsigned nl_port(int s)
{
	struct sockaddr_nl nl = {0};
	socklen_t len = sizeof nl;
	return getsockname(s, (struct sockaddr *)&nl, &len) < 0 ? 0xFFFFFFFFu : nl.nl_pid;
}

/* Try to take the port id `id` of the node's netlink namespace, every way there is. */
static void do_nlsquat(unsigned id, unsigned secs)
{
	int a = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
	int b = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
	int c = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
	int d = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
	if (a < 0 || b < 0 || c < 0 || d < 0) {
		printf("nlsquat socket %d\n", errno);
		return;
	}
	struct sockaddr_nl want = {.nl_family = AF_NETLINK, .nl_pid = id};
	int e_bind = err(bind(b, (struct sockaddr *)&want, sizeof want));
	want.nl_groups = 1;   /* RTMGRP_LINK: open to anyone */
	int e_group = err(bind(c, (struct sockaddr *)&want, sizeof want));
	struct {
		struct nlmsghdr h;
		struct rtgenmsg g;
	} req = {.h = {.nlmsg_len = sizeof req, .nlmsg_type = RTM_GETLINK,
		       .nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP, .nlmsg_seq = 1},
		 .g = {.rtgen_family = AF_UNSPEC}};
	struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
	if (sendto(d, &req, sizeof req, 0, (struct sockaddr *)&kernel, sizeof kernel) < 0)
		printf("nlsquat sendto %d\n", errno);
	printf("nlsquat %u %d %u %d %u %u %d\n", nl_port(a), e_bind, nl_port(b), e_group,
	       nl_port(c), nl_port(d), (int)getpid());
	sleep(secs);   /* held while the test binds the id itself */
}

static int do_read(const char *path)
{
	char buf[64];
	int fd = open(path, O_RDONLY);
	if (fd < 0)
		return errno;
	int e = read(fd, buf, sizeof buf) < 0 ? errno : 0;
	close(fd);
	return e;
}

static void do_handle(const char *path)
{
	struct {
		struct file_handle fh;
		unsigned char buf[128];
	} h;
	int mnt = -1, e_name, e_open;
	h.fh.handle_bytes = 128;
	e_name = err(name_to_handle_at(AT_FDCWD, path, &h.fh, &mnt, 0));
	int root = open("/", O_RDONLY | O_DIRECTORY);
	if (e_name) {   /* forge a handle: ext4-style inode 2 (the fs root) */
		h.fh.handle_bytes = 8;
		h.fh.handle_type = 1;
		memset(h.buf, 0, 8);
		h.buf[0] = 2;
	}
	int fd = open_by_handle_at(root, &h.fh, O_RDONLY);
	e_open = fd < 0 ? errno : 0;
	printf("handle %d %d\n", e_name, e_open);
}

static void do_chroot(const char *marker)
{
	struct stat before, after;
	stat("/", &before);
	mkdir("/tmp/jail", 0755);
	int e1 = err(chroot("/tmp/jail"));
	for (int i = 0; i < 64; i++)
		if (chdir("..") < 0)
			break;
	if (!e1)
		e1 = err(chroot("."));
	int e2 = do_read(marker);
	stat("/", &after);
	printf("chroot %d %d %d\n", e1, e2,
	       before.st_ino == after.st_ino && before.st_dev == after.st_dev);
}

static long x32_getpid(void)
{
	long ret;
	__asm__ volatile("syscall" : "=a"(ret) : "a"(0x40000000L | 39) : "rcx", "r11", "memory");
	return ret;
}

static long i386_getpid(void)
{
	long ret;
	__asm__ volatile("int $0x80" : "=a"(ret) : "a"(20L) : "memory");
	return ret;
}

/* -- the sockaddr race ------------------------------------------------------------- */
static struct sockaddr_in race_sa;
static atomic_int race_stop;
static unsigned short race_ok, race_bad;

static void *flipper(void *arg)
{
	(void)arg;
	volatile unsigned short *p = &race_sa.sin_port;
	while (!atomic_load_explicit(&race_stop, memory_order_relaxed)) {
		*p = htons(race_bad);
		*p = htons(race_ok);
	}
	return NULL;
}

static void do_race(const char *addr, int ok, int bad, int n)
{
	pthread_t t;
	int bound_ok = 0, bound_other = 0, failed = 0;
	race_ok = (unsigned short)ok;
	race_bad = (unsigned short)bad;
	race_sa.sin_family = AF_INET;
	race_sa.sin_port = htons(race_ok);
	inet_pton(AF_INET, addr, &race_sa.sin_addr);
	pthread_create(&t, NULL, flipper, NULL);
	for (int i = 0; i < n; i++) {
		int s = socket(AF_INET, SOCK_STREAM, 0);
		int one = 1;
		setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
		if (bind(s, (struct sockaddr *)&race_sa, sizeof race_sa) == 0) {
			struct sockaddr_in got;
			socklen_t len = sizeof got;
			getsockname(s, (struct sockaddr *)&got, &len);
			if (ntohs(got.sin_port) == ok)
				bound_ok++;
			else
				bound_other++;
		} else {
			failed++;
		}
		close(s);
	}
	atomic_store(&race_stop, 1);
	pthread_join(t, NULL);
	printf("race %d %d %d %d\n", n, bound_ok, bound_other, failed);
}

static void do_bind(const char *addr, int port, int v6only0, int type, int proto,
		    int freebind)
{
	struct sockaddr_storage ss = {0};
	socklen_t len;
	int fam;
	struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
	struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
	if (inet_pton(AF_INET, addr, &s4->sin_addr) == 1) {
		fam = s4->sin_family = AF_INET;
		s4->sin_port = htons((unsigned short)port);
		len = sizeof *s4;
	} else if (inet_pton(AF_INET6, addr, &s6->sin6_addr) == 1) {
		fam = s6->sin6_family = AF_INET6;
		s6->sin6_port = htons((unsigned short)port);
		len = sizeof *s6;
	} else {
		fprintf(stderr, "attacker: bad address %s\n", addr);
		exit(2);
	}
	int s = socket(fam, type, proto);
	if (s < 0) {
		printf("socket %d 0\n", errno);
		return;
	}
	if (freebind) {
		int one = 1;
		setsockopt(s, fam == AF_INET ? IPPROTO_IP : IPPROTO_IPV6,
			   fam == AF_INET ? IP_FREEBIND : IPV6_FREEBIND, &one, sizeof one);
	}
	if (v6only0) {
		int zero = 0;
		setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
	}
	int e = err(bind(s, (struct sockaddr *)&ss, len));
	int got = 0;
	if (!e) {
		struct sockaddr_storage g;
		socklen_t gl = sizeof g;
		getsockname(s, (struct sockaddr *)&g, &gl);
		got = ntohs(g.ss_family == AF_INET ? ((struct sockaddr_in *)&g)->sin_port
						   : ((struct sockaddr_in6 *)&g)->sin6_port);
	}
	printf("bind %d %d\n", e, got);
}

static void *one_bind(void *arg)
{
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((unsigned short)(long)arg)};
	sa.sin_addr.s_addr = htonl(0x7f000001);
	int s = socket(AF_INET, SOCK_STREAM, 0);
	bind(s, (struct sockaddr *)&sa, sizeof sa);
	close(s);
	return NULL;
}

/* -- the agent socket ---------------------------------------------------------------- */
static void do_hold(const char *path, int n, int secs)
{
	int connected = 0;
	for (int i = 0; i < n; i++)
		if (unix_connect(path, 0) >= 0)
			connected++;
	printf("hold %d\n", connected);
	fflush(stdout);
	sleep((unsigned)secs);
}

static void do_junkfds(const char *path, int n)
{
	int sent = 0, fds[200];
	int nul = open("/dev/null", O_RDONLY);
	int p[2];
	if (pipe(p) < 0)
		exit(2);
	for (int i = 0; i < 200; i++)
		fds[i] = i % 3 == 0 ? nul : (i % 3 == 1 ? p[0] : p[1]);
	for (int i = 0; i < n; i++) {
		int s = unix_connect(path, 0);
		if (s < 0)
			continue;
		char junk[512];
		for (size_t j = 0; j < sizeof junk; j++)
			junk[j] = (char)(j * 7 + i);
		char cbuf[CMSG_SPACE(sizeof fds)];
		struct iovec iov = {junk, sizeof junk};
		struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
				   .msg_controllen = sizeof cbuf};
		struct cmsghdr *c = CMSG_FIRSTHDR(&m);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof fds);
		memcpy(CMSG_DATA(c), fds, sizeof fds);
		if (sendmsg(s, &m, MSG_NOSIGNAL) > 0)
			sent++;
		/* a second message with fds after the first: the agent must not keep them */
		sendmsg(s, &m, MSG_NOSIGNAL);
		close(s);
	}
	printf("junkfds %d\n", sent);
}

static void do_slow(const char *path, int secs)
{
	const char *req = "POST / HTTP/1.0\r\nContent-Length: 100000\r\n\r\n";
	int s = unix_connect(path, 0);
	if (s < 0) {
		printf("slow -1\n");
		return;
	}
	time_t start = time(NULL);
	size_t i = 0;
	for (int t = 0; t < secs * 4; t++) {
		char c = i < strlen(req) ? req[i] : 'x';
		i++;
		if (send(s, &c, 1, MSG_NOSIGNAL) < 0)
			break;
		char buf[256];
		ssize_t r = recv(s, buf, sizeof buf, MSG_DONTWAIT);
		if (r == 0 || (r < 0 && errno != EAGAIN))
			break;
		usleep(250000);
	}
	printf("slow %ld\n", (long)(time(NULL) - start));
}

static void do_call(const char *path)
{
	char buf[65536];
	ssize_t n;
	int s = unix_connect(path, 0);
	if (s < 0) {
		perror("connect");
		exit(1);
	}
	while ((n = read(0, buf, sizeof buf)) > 0)
		if (write(s, buf, (size_t)n) != n)
			break;
	shutdown(s, SHUT_WR);
	while ((n = read(s, buf, sizeof buf)) > 0)
		if (write(1, buf, (size_t)n) != n)
			break;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	signal(SIGPIPE, SIG_IGN);   /* a peer that answers early and closes: keep reading */
	if (argc < 2)
		return 2;
	const char *cmd = argv[1];
#define NEED(k) do { if (argc < (k) + 2) { fprintf(stderr, "%s: arguments\n", cmd); return 2; } } while (0)
	if (!strcmp(cmd, "read")) {
		NEED(1);
		printf("read %d\n", do_read(argv[2]));
	} else if (!strcmp(cmd, "handle")) {
		NEED(1);
		do_handle(argv[2]);
	} else if (!strcmp(cmd, "chroot")) {
		NEED(1);
		do_chroot(argv[2]);
	} else if (!strcmp(cmd, "abstract")) {
		NEED(1);
		int s = unix_connect(argv[2], 1);
		printf("abstract %d\n", s < 0 ? errno : 0);
	} else if (!strcmp(cmd, "alisten")) {
		NEED(2);
		struct sockaddr_un sa = {.sun_family = AF_UNIX};
		int s = socket(AF_UNIX, SOCK_STREAM, 0);
		strncpy(sa.sun_path + 1, argv[2], sizeof sa.sun_path - 2);
		socklen_t len = offsetof(struct sockaddr_un, sun_path) + 1 + strlen(argv[2]);
		int e = err(bind(s, (struct sockaddr *)&sa, len));
		if (!e)
			e = err(listen(s, 8));
		printf("alisten %d\n", e);
		fflush(stdout);
		if (!e)
			sleep((unsigned)atoi(argv[3]));
	} else if (!strcmp(cmd, "socket")) {
		NEED(3);
		printf("socket %d\n", err(socket(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]))));
	} else if (!strcmp(cmd, "uring")) {
		unsigned char params[120] = {0};
		printf("uring %d\n", err(syscall(425, 8, params)));
	} else if (!strcmp(cmd, "x32")) {
		printf("x32 %ld i386 %ld\n", x32_getpid(), i386_getpid());
	} else if (!strcmp(cmd, "mknod")) {
		NEED(1);
		printf("mknod %d\n", err(mknod(argv[2], S_IFBLK | 0600, makedev(8, 0))));
	} else if (!strcmp(cmd, "ptrace")) {
		NEED(1);
		printf("ptrace %d\n", err(ptrace(PTRACE_ATTACH, atoi(argv[2]), 0, 0)));
	} else if (!strcmp(cmd, "shm")) {
		NEED(1);
		printf("shm %d\n", err(shmget((key_t)strtol(argv[2], NULL, 0), 0, 0)));
	} else if (!strcmp(cmd, "killall")) {
		printf("killall %d\n", err(kill(-1, SIGKILL)));
	} else if (!strcmp(cmd, "bpf")) {
		unsigned int attr[32] = {2 /* ARRAY */, 4, 8, 1};
		printf("bpf %d\n", err(syscall(SYS_bpf, 0 /* MAP_CREATE */, attr, sizeof attr)));
	} else if (!strcmp(cmd, "perf")) {
		unsigned char attr[128] = {0};
		attr[0] = 1;                 /* type PERF_TYPE_SOFTWARE */
		attr[4] = sizeof attr;       /* size */
		printf("perf %d\n", err(syscall(SYS_perf_event_open, attr, -1, 0, -1, 0)));
	} else if (!strcmp(cmd, "sockfill")) {
		NEED(2);
		static char chunk[65536];
		long long total = 0;
		for (int i = 0; i < atoi(argv[2]); i++) {
			int sv[2];
			if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv) < 0)
				break;
			ssize_t w;
			while ((w = send(sv[0], chunk, sizeof chunk, MSG_NOSIGNAL)) > 0)
				total += w;
		}
		printf("sockfill %lld\n", total);
		fflush(stdout);
		sleep((unsigned)atoi(argv[3]));
	} else if (!strcmp(cmd, "stealfd")) {
		NEED(2);
		int pfd = (int)syscall(SYS_pidfd_open, atoi(argv[2]), 0);
		int fd = pfd < 0 ? -1 : (int)syscall(SYS_pidfd_getfd, pfd, atoi(argv[3]), 0);
		if (fd < 0) {
			printf("stealfd %d -1 -\n", errno);
			return 0;
		}
		char c = '#';
		int e_sti = err(ioctl(fd, TIOCSTI, &c));
		char buf[64] = {0};
		if (argc > 4)
			sleep((unsigned)atoi(argv[4]));
		struct pollfd pl = {.fd = fd, .events = POLLIN};
		ssize_t n = poll(&pl, 1, 2000) == 1 ? read(fd, buf, sizeof buf - 1) : -1;
		for (ssize_t i = 0; i < n; i++)
			if (buf[i] == '\n' || buf[i] == ' ')
				buf[i] = '_';
		printf("stealfd 0 %d %s\n", e_sti, n > 0 ? buf : "-");
	} else if (!strcmp(cmd, "seccomp")) {
		struct sock_filter code[] = {
			BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
			BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_bind, 0, 1),
			BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
			BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		};
		struct sock_fprog prog = {sizeof code / sizeof code[0], code};
		long r = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER,
				 SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);
		printf("seccomp %d\n", r < 0 ? errno : 0);
	} else if (!strcmp(cmd, "badbinds")) {
		NEED(1);
		struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[2]))};
		sa.sin_addr.s_addr = htonl(0x7f000001);
		struct sockaddr_in6 s6 = {.sin6_family = AF_INET6, .sin6_port = sa.sin_port};
		int s4 = socket(AF_INET, SOCK_STREAM, 0), nul = open("/dev/null", O_RDONLY);
		char *page = mmap(NULL, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		printf("badbinds %d %d %d %d %d %d %d %d\n",
		       err(bind(-1, (struct sockaddr *)&sa, sizeof sa)),
		       err(bind(nul, (struct sockaddr *)&sa, sizeof sa)),
		       err(bind(s4, NULL, sizeof sa)),
		       err(bind(s4, (struct sockaddr *)page, sizeof sa)),
		       err(bind(s4, (struct sockaddr *)&sa, 0x7fffffff)),
		       err(bind(s4, (struct sockaddr *)&sa, 1)),
		       err(bind(s4, (struct sockaddr *)&s6, sizeof s6)),
		       err(bind(12345, (struct sockaddr *)&sa, sizeof sa)));
	} else if (!strcmp(cmd, "subvol")) {
		NEED(2);
		static struct {
			long long fd;
			char name[4088];
		} args;
		strncpy(args.name, argv[3], sizeof args.name - 1);
		int dfd = open(argv[2], O_RDONLY | O_DIRECTORY);
		printf("subvol %d\n", dfd < 0 ? errno : err(ioctl(dfd, 0x5000940EUL, &args)));
	} else if (!strcmp(cmd, "sniffers")) {
		NEED(3);
		const char *body = "<?xml version='1.0'?><methodCall><methodName>OpenSniffer"
				   "</methodName><params></params></methodCall>";
		char req[512];
		snprintf(req, sizeof req, "POST / HTTP/1.0\r\nContent-Length: %zu\r\n\r\n%s",
			 strlen(body), body);
		int got = 0;
		for (int i = 0; i < atoi(argv[3]); i++) {
			int s = unix_connect(argv[2], 0);
			if (s < 0)
				continue;
			if (write(s, req, strlen(req)) < 0) {
				close(s);
				continue;
			}
			char buf[4096], cbuf[CMSG_SPACE(4 * sizeof(int))];
			for (;;) {
				struct iovec iov = {buf, sizeof buf};
				struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
						   .msg_controllen = sizeof cbuf};
				ssize_t n = recvmsg(s, &m, 0);
				if (n <= 0)
					break;
				for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
					if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
						got++;   /* kept open */
			}
			close(s);
			if (i % 10 == 9)
				usleep(200000);
		}
		printf("sniffers %d\n", got);
		fflush(stdout);
		sleep((unsigned)atoi(argv[4]));
	} else if (!strcmp(cmd, "sniff1")) {
		NEED(4);
		const char *body = "<?xml version='1.0'?><methodCall><methodName>OpenSniffer"
				   "</methodName><params></params></methodCall>";
		char req[512], buf[65536], cbuf[CMSG_SPACE(4 * sizeof(int))];
		snprintf(req, sizeof req, "POST / HTTP/1.0\r\nContent-Length: %zu\r\n\r\n%s",
			 strlen(body), body);
		int s = unix_connect(argv[2], 0), sn = -1;
		if (s < 0 || write(s, req, strlen(req)) < 0) {
			printf("sniff1 connect %d\n", errno);
			return 0;
		}
		for (;;) {
			struct iovec iov = {buf, sizeof buf};
			struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
					   .msg_controllen = sizeof cbuf};
			ssize_t n = recvmsg(s, &m, 0);
			if (n <= 0)
				break;
			for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
				if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
					memcpy(&sn, CMSG_DATA(c), sizeof sn);
		}
		close(s);
		if (sn < 0) {
			printf("sniff1 nosocket\n");
			return 0;
		}
		printf("sniff1 ready\n");
		fflush(stdout);
		struct timeval tv = {0, 200000};
		setsockopt(sn, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
		int with1 = 0, with2 = 0, total = 0;
		time_t end = time(NULL) + atoi(argv[3]);
		while (time(NULL) < end) {
			ssize_t n = recv(sn, buf, sizeof buf, 0);
			if (n <= 0)
				continue;
			total++;
			if (memmem(buf, (size_t)n, argv[4], strlen(argv[4])))
				with1++;
			if (memmem(buf, (size_t)n, argv[5], strlen(argv[5])))
				with2++;
		}
		printf("sniff1 %d %d %d\n", with1, with2, total);
	} else if (!strcmp(cmd, "udpflood")) {
		NEED(2);
		struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[2]))};
		to.sin_addr.s_addr = htonl(0x7f000001);
		int s = socket(AF_INET, SOCK_DGRAM, 0);
		long sent = 0;
		time_t end = time(NULL) + atoi(argv[3]);
		char payload[64] = "flood";
		while (time(NULL) < end)
			for (int k = 0; k < 1000; k++)
				if (sendto(s, payload, sizeof payload, 0, (struct sockaddr *)&to, sizeof to) > 0)
					sent++;
		printf("udpflood %ld\n", sent);
	} else if (!strcmp(cmd, "threadbinds")) {
		NEED(2);
		int n = atoi(argv[3]);
		for (int i = 0; i < n; i++) {
			pthread_t t;
			if (pthread_create(&t, NULL, one_bind, (void *)(long)atoi(argv[2])) == 0)
				pthread_join(t, NULL);
		}
		printf("threadbinds %d\n", n);
	} else if (!strcmp(cmd, "race")) {
		NEED(4);
		do_race(argv[2], atoi(argv[3]), atoi(argv[4]), atoi(argv[5]));
	} else if (!strcmp(cmd, "bind")) {
		NEED(2);
		do_bind(argv[2], atoi(argv[3]), argc > 4 && !strcmp(argv[4], "v6only0"),
			SOCK_STREAM, 0, 0);
	} else if (!strcmp(cmd, "bindp")) {
		NEED(4);
		do_bind(argv[4], atoi(argv[5]), 0, atoi(argv[2]), atoi(argv[3]),
			argc > 6 && !strcmp(argv[6], "freebind"));
	} else if (!strcmp(cmd, "hold")) {
		NEED(3);
		do_hold(argv[2], atoi(argv[3]), atoi(argv[4]));
	} else if (!strcmp(cmd, "udphold")) {
		NEED(3);
		struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
		inet_pton(AF_INET, argv[2], &sa.sin_addr);
		int s = socket(AF_INET, SOCK_DGRAM, 0);
		int e = bind(s, (struct sockaddr *)&sa, sizeof sa) < 0 ? errno : 0;
		printf("udphold %d\n", e);
		fflush(stdout);
		if (e)
			return 0;
		time_t end = time(NULL) + atoi(argv[4]);
		while (time(NULL) < end) {
			if (argc > 5)
				sendto(s, argv[5], strlen(argv[5]), 0, (struct sockaddr *)&sa, sizeof sa);
			struct pollfd pfd = {s, POLLIN, 0};
			while (poll(&pfd, 1, 100) > 0) {
				char buf[2048];
				ssize_t n = recv(s, buf, sizeof buf - 1, 0);
				if (n <= 0)
					break;
				buf[n] = 0;
				printf("msg %s\n", buf);
				fflush(stdout);
			}
		}
		printf("udphold done\n");
	} else if (!strcmp(cmd, "junkfds")) {
		NEED(2);
		do_junkfds(argv[2], atoi(argv[3]));
	} else if (!strcmp(cmd, "slow")) {
		NEED(2);
		do_slow(argv[2], atoi(argv[3]));
	} else if (!strcmp(cmd, "call")) {
		NEED(1);
		do_call(argv[2]);
	} else if (!strcmp(cmd, "mlisten") || !strcmp(cmd, "mconnect")) {
		NEED(3);
		do_mptcp(cmd[1] == 'l', argv[2], atoi(argv[3]), (unsigned)atoi(argv[4]));
	} else if (!strcmp(cmd, "nlsquat")) {
		NEED(2);
		do_nlsquat((unsigned)strtoul(argv[2], NULL, 0), (unsigned)atoi(argv[3]));
	} else {
		fprintf(stderr, "attacker: unknown command %s\n", cmd);
		return 2;
	}
	return 0;
}
