/*
 * sliver-init: the PID 1 of a PlanetLab sliver.
 *
 * Started by kernel/context.py as root on the host. It builds the sliver's namespaces
 * and root, then stays as PID 1: it reaps orphans and runs commands for the host on
 * request, so every process of the sliver (entered ones too) descends from it and is
 * covered by the guard filter it installs before its first child.
 *
 * Setup, in order (each step reports "error STEP: reason" on the sync socket):
 *   launcher: reset signal mask and dispositions; join the cgroups given; chdir into
 *             the root (as host root, which may reach it); rlimits (raising a hard
 *             limit needs the host's CAP_SYS_RESOURCE); unshare(USER); the host writes
 *             uid_map/gid_map; become root inside; fork sockd (sockd.h: it makes the
 *             sliver's IP and netlink sockets in the node's network namespace) and
 *             report its pid; unshare(NS, UTS, IPC, PID, CGROUP, NET); fork the init;
 *             exit.
 *   init:     report its host pid; private mounts; clone the root as a mount of our
 *             own; mount proc (before the old root goes: the kernel wants a full proc
 *             visible, KERNEL-FACTS); tmpfs /dev with host device nodes bound in,
 *             devpts newinstance, /dev/shm; pivot_root; detach the old root; hostname;
 *             capability bounding set; no_new_privs; Landlock scoping (abstract Unix
 *             sockets, signals; TCP bind too with a guard); seccomp guard with a listener
 *             (sent to the agent and kept at fd GUARD_FD); the socket filter with its
 *             listener, sent to sockd; then "ready" and serve.
 *
 * Sync protocol (SOCK_STREAM socketpair, fd given by --sync):
 *   host -> launcher: 'm' (maps written) with the control socket's listening fd
 *                     (SCM_RIGHTS; the host binds it while the launcher starts)
 *   launcher -> host: "userns\n", "sockd N\n" (its host pid);
 *   init -> host: "pid N\n" (its host pid), "ready\n"
 *   any failure: "error STEP: strerror\n" and exit 1.
 *
 * Control protocol (root-only AF_UNIX stream socket, listening fd sent with 'm' and
 * kept at CTL_FD): the client sends struct req_hdr with 0 or 3 fds (stdin, stdout,
 * stderr) by SCM_RIGHTS, then hdr.len bytes of NUL-terminated tagged strings:
 * "u<user>", "c<cwd>", "a<argv item>"..., "e<env item>"... The init answers with
 * struct reply messages: STARTED (value = pid inside the sliver; with REQ_TTY the
 * pty master fd rides along), then EXITED (value = wait status); or ERROR (value =
 * errno, msg = step). While the command runs the client may send int32 signal
 * numbers, which the init delivers to the command.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <grp.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#ifndef OPEN_TREE_CLONE
#define OPEN_TREE_CLONE 1
#define OPEN_TREE_CLOEXEC O_CLOEXEC
#endif
#ifndef MOVE_MOUNT_F_EMPTY_PATH
#define MOVE_MOUNT_F_EMPTY_PATH 0x00000004
#endif
#ifndef AT_RECURSIVE
#define AT_RECURSIVE 0x8000
#endif
#include <linux/securebits.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define CTL_FD 3            /* the control socket, in the init */
#define GUARD_FD 4          /* the init's own copy of the seccomp listener */
#define SOCKD_FD 5          /* with a guard: the agent's end of sockd's requests */
#define REQ_MAGIC 0x534c5652u  /* "SLVR" */
#define REQ_TTY 1u
#define REQ_MAX 262144u     /* bound on a request's strings */
#define MAX_ARGS 4096
#define MAX_GROUPS 64

enum { R_STARTED = 1, R_EXITED = 2, R_ERROR = 3 };

struct req_hdr {
	uint32_t magic;
	uint32_t flags;
	uint32_t len;
	uint16_t rows, cols;
};

struct reply {
	int32_t type;
	int32_t value;
	char msg[120];
};

static int sync_fd = -1;

/* Report a failed setup step to the host and exit. */
static void die(const char *step, int err)
{
	char buf[512];
	int n = snprintf(buf, sizeof buf, "error %s: %s\n", step, strerror(err));
	if (n >= (int)sizeof buf) {      /* truncated: keep the line a line */
		n = (int)sizeof buf - 1;
		buf[n - 1] = '\n';
	}
	if (sync_fd >= 0 && n > 0)
		(void)!write(sync_fd, buf, (size_t)n);
	_exit(1);
}

static void say(const char *fmt, ...)
{
	char buf[128];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	if (n <= 0 || n >= (int)sizeof buf)
		die("sync message", EOVERFLOW);
	if (write(sync_fd, buf, (size_t)n) != n)
		die("sync write", errno ? errno : EPIPE);
}

/* Wait for 'm' (our uid/gid maps are written) and the control socket with it. */
static int recv_ctl(void)
{
	char c;
	int fd = -1;
	struct iovec iov = { .iov_base = &c, .iov_len = 1 };
	union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int))]; } cm;
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1,
			     .msg_control = cm.buf, .msg_controllen = sizeof cm.buf };
	ssize_t n = recvmsg(sync_fd, &mh, MSG_CMSG_CLOEXEC);
	struct cmsghdr *h = CMSG_FIRSTHDR(&mh);
	if (h && h->cmsg_level == SOL_SOCKET && h->cmsg_type == SCM_RIGHTS &&
	    h->cmsg_len == CMSG_LEN(sizeof(int)))
		memcpy(&fd, CMSG_DATA(h), sizeof fd);
	if (n != 1 || c != 'm' || fd < 0 || (mh.msg_flags & MSG_CTRUNC))
		die("wait for uid/gid maps and the control socket", n < 0 ? errno : EPROTO);
	return fd;
}

/* Move fd to number `to` (close-on-exec) or die. */
static void move_fd(int fd, int to, const char *step)
{
	if (fd == to) {
		if (fcntl(fd, F_SETFD, FD_CLOEXEC) < 0)
			die(step, errno);
		return;
	}
	if (dup3(fd, to, O_CLOEXEC) < 0)
		die(step, errno);
	close(fd);
}

/* PR_SET_DUMPABLE 0, checked (F42). Owned by the node's root then, /proc/<pid>/fd,
 * mem, environ and ptrace/pidfd_getfd/process_vm_* need CAP_SYS_PTRACE over the
 * namespace our mm belongs to: the node's, which no sliver has. */
static void non_dumpable(const char *step)
{
	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0 || prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 0)
		die(step, errno ? errno : EPERM);
}

#include "sockd.h"

/* ---- setup ---- */

struct opts {
	int ctl, guard_filter, guard_sink;
	unsigned long owner;   /* the host uid the user namespace is made as (0: root's) */
	const char *root, *hostname;
	uint64_t capbset;
	int nrl;
	struct { int res; struct rlimit rl; char name[100]; } rl[RLIM_NLIMITS];
	int ncg;
	const char *cgroups[16];
	long launcher_delay_ms;   /* tests: the launcher lingers this long after the fork */
	unsigned long long shm_size;   /* bytes of /dev/shm (its tmpfs size=) */
	int oom_score_adj;             /* of the whole sliver, set as host root */
	int have_oom;
};

static int rlimit_res(const char *name)
{
	static const struct { const char *n; int r; } t[] = {
		{"as", RLIMIT_AS}, {"core", RLIMIT_CORE}, {"cpu", RLIMIT_CPU},
		{"data", RLIMIT_DATA}, {"fsize", RLIMIT_FSIZE}, {"locks", RLIMIT_LOCKS},
		{"memlock", RLIMIT_MEMLOCK}, {"msgqueue", RLIMIT_MSGQUEUE},
		{"nice", RLIMIT_NICE}, {"nofile", RLIMIT_NOFILE}, {"nproc", RLIMIT_NPROC},
		{"rss", RLIMIT_RSS}, {"rtprio", RLIMIT_RTPRIO}, {"rttime", RLIMIT_RTTIME},
		{"sigpending", RLIMIT_SIGPENDING}, {"stack", RLIMIT_STACK},
	};
	for (size_t i = 0; i < sizeof t / sizeof t[0]; i++)
		if (strcmp(t[i].n, name) == 0)
			return t[i].r;
	return -1;
}

static void parse_opts(int argc, char **argv, struct opts *o)
{
	static const struct option lo[] = {
		{"sync", 1, 0, 's'}, {"root", 1, 0, 'r'},
		{"hostname", 1, 0, 'h'}, {"capbset", 1, 0, 'b'}, {"rlimit", 1, 0, 'l'},
		{"guard-filter", 1, 0, 'f'}, {"guard-sink", 1, 0, 'k'}, {"cgroup", 1, 0, 'g'},
		{"launcher-delay-ms", 1, 0, 'd'}, {"owner", 1, 0, 'o'},
		{"shm-size", 1, 0, 'm'}, {"oom-score-adj", 1, 0, 'j'},
		{0, 0, 0, 0},
	};
	int c;
	memset(o, 0, sizeof *o);
	o->ctl = o->guard_filter = o->guard_sink = -1;
	o->capbset = ~0ULL;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		char name[32];
		unsigned long long soft, hard;
		switch (c) {
		case 's': sync_fd = atoi(optarg); break;
		case 'r': o->root = optarg; break;
		case 'h': o->hostname = optarg; break;
		case 'b': o->capbset = strtoull(optarg, NULL, 16); break;
		case 'f': o->guard_filter = atoi(optarg); break;
		case 'k': o->guard_sink = atoi(optarg); break;
		case 'o':
			o->owner = strtoul(optarg, NULL, 10);
			if (o->owner < 1 || o->owner > 0xfffffffeUL)
				die("parse --owner (1..2^32-2)", EINVAL);
			break;
		case 'm': {
			char *end;
			errno = 0;
			o->shm_size = strtoull(optarg, &end, 10);
			if (errno || *end || o->shm_size < 4096)
				die("parse --shm-size (bytes, at least 4096)", EINVAL);
			break;
		}
		case 'j': {
			char *end;
			long v = strtol(optarg, &end, 10);
			if (*end || v < -1000 || v > 1000)
				die("parse --oom-score-adj (-1000..1000)", EINVAL);
			o->oom_score_adj = (int)v;
			o->have_oom = 1;
			break;
		}
		case 'd':
			o->launcher_delay_ms = strtol(optarg, NULL, 10);
			if (o->launcher_delay_ms < 0 || o->launcher_delay_ms > 10000)
				die("parse --launcher-delay-ms (0..10000)", EINVAL);
			break;
		case 'g':
			if (o->ncg >= 16 || strlen(optarg) > 4000)
				die("parse --cgroup (at most 16 paths of 4000 bytes)", EINVAL);
			o->cgroups[o->ncg++] = optarg;
			break;
		case 'l':
			if (o->nrl >= RLIM_NLIMITS ||
			    sscanf(optarg, "%31[a-z]:%llu:%llu", name, &soft, &hard) != 3 ||
			    (o->rl[o->nrl].res = rlimit_res(name)) < 0)
				die("parse --rlimit", EINVAL);
			snprintf(o->rl[o->nrl].name, sizeof o->rl[o->nrl].name,
				 "setrlimit %s (raising a hard limit needs CAP_SYS_RESOURCE)", name);
			o->rl[o->nrl].rl.rlim_cur = soft;
			o->rl[o->nrl].rl.rlim_max = hard;
			o->nrl++;
			break;
		default: die("parse arguments", EINVAL);
		}
	}
	if (!o->shm_size)
		o->shm_size = 64ULL << 20;   /* never the kernel's default: half of the host's RAM */
	if (sync_fd < 0 || !o->root || !o->hostname)
		die("parse arguments (need --sync --root --hostname)", EINVAL);
	if (o->guard_sink >= 0 && o->guard_filter < 0)
		die("parse arguments (--guard-sink needs --guard-filter)", EINVAL);
}

static void bind_dev(const char *name)
{
	char src[64], dst[64];
	snprintf(src, sizeof src, "/dev/%s", name);
	snprintf(dst, sizeof dst, "dev/%s", name);
	int fd = open(dst, O_WRONLY | O_CREAT | O_CLOEXEC, 0666);
	if (fd < 0)
		die("create /dev node", errno);
	close(fd);
	if (mount(src, dst, NULL, MS_BIND, NULL) < 0)
		die("bind /dev node", errno);
}

static void ensure_dir(const char *path, const char *step)
{
	if (mkdir(path, 0755) < 0 && errno != EEXIST)
		die(step, errno);
}

/* A real directory at `path` of the sliver's own root, where something is mounted:
 * whatever else the sliver left there (a symlink to a host path, a file) is removed
 * first, so that the mount, made while our view is still the host's, cannot be
 * redirected out of the root. */
static void real_dir(const char *path, const char *step)
{
	struct stat st;
	if (lstat(path, &st) == 0 && !S_ISDIR(st.st_mode) && unlink(path) < 0)
		die(step, errno);
	ensure_dir(path, step);
	if (lstat(path, &st) < 0 || !S_ISDIR(st.st_mode))
		die(step, ENOTDIR);
}

static void setup_root(const struct opts *o)
{
	static const char *devs[] = {"null", "zero", "full", "random", "urandom", "tty"};
	static const char *links[][2] = {
		{"pts/ptmx", "dev/ptmx"}, {"/proc/self/fd", "dev/fd"},
		{"/proc/self/fd/0", "dev/stdin"}, {"/proc/self/fd/1", "dev/stdout"},
		{"/proc/self/fd/2", "dev/stderr"},
	};
	if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
		die("make mounts private", errno);
	/* cwd is the root (entered by the launcher). pivot_root needs it to be a mount
	 * we made (copies of host mounts are locked), reached without walking the path
	 * from "/": clone it as a detached tree, attach that on top of cwd, and fchdir
	 * into the clone's fd. */
	int tree = (int)syscall(SYS_open_tree, AT_FDCWD, ".",
				OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE);
	if (tree < 0)
		die("clone root mount (open_tree)", errno);
	if (syscall(SYS_move_mount, tree, "", AT_FDCWD, ".", MOVE_MOUNT_F_EMPTY_PATH) < 0)
		die("attach root mount (move_mount)", errno);
	if (fchdir(tree) < 0)
		die("enter root mount", errno);
	close(tree);
	real_dir("proc", "mkdir /proc");
	if (mount("proc", "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
		die("mount /proc", errno);
	real_dir("dev", "mkdir /dev");
	if (mount("tmpfs", "dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=64k,nr_inodes=64") < 0)
		die("mount /dev tmpfs", errno);
	for (size_t i = 0; i < sizeof devs / sizeof devs[0]; i++)
		bind_dev(devs[i]);
	ensure_dir("dev/pts", "mkdir /dev/pts");
	if (mount("devpts", "dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
		  "newinstance,ptmxmode=0666,mode=620,gid=5") < 0)
		die("mount /dev/pts", errno);
	ensure_dir("dev/shm", "mkdir /dev/shm");
	/* Bounded (F34): tmpfs pages stay charged to the sliver while the mount lives,
	 * owned by no process; the default size would be half of the host's RAM. */
	char shmopts[96];
	snprintf(shmopts, sizeof shmopts, "mode=1777,size=%llu,nr_inodes=%llu",
		 o->shm_size, o->shm_size / 4096 < 1024 ? 1024 : o->shm_size / 4096);
	if (mount("tmpfs", "dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, shmopts) < 0)
		die("mount /dev/shm", errno);
	for (size_t i = 0; i < sizeof links / sizeof links[0]; i++)
		if (symlink(links[i][0], links[i][1]) < 0)
			die("symlink in /dev", errno);
	/* pivot_root(".", "."): the old root ends up stacked on "/", then detached. */
	if (syscall(SYS_pivot_root, ".", ".") < 0)
		die("pivot_root", errno);
	if (umount2(".", MNT_DETACH) < 0)
		die("detach old root", errno);
	if (chdir("/") < 0)
		die("chdir /", errno);
	/* No nested user namespace (F39): its owner would have every capability the
	 * bounding set drops. The seccomp filter refuses CLONE_NEWUSER too; this limit
	 * of the sliver's own user namespace holds without it. Raising it back needs
	 * CAP_SYS_RESOURCE, which the bounding set drops unless a tag grants it. */
	int un = open("/proc/sys/user/max_user_namespaces", O_WRONLY | O_CLOEXEC);
	if (un < 0 || write(un, "0", 1) != 1)
		die("set user.max_user_namespaces to 0", errno);
	close(un);
}

static void drop_bounding_set(uint64_t keep)
{
	int last = 40;
	FILE *f = fopen("/proc/sys/kernel/cap_last_cap", "re");
	if (f) {
		if (fscanf(f, "%d", &last) != 1)
			last = 40;
		fclose(f);
	}
	for (int cap = 0; cap <= last && cap < 64; cap++)
		if (!(keep & (1ULL << cap)) && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0)
			die("drop capability from bounding set", errno);
}

/* Put the sliver in a Landlock domain of its own (docs/guard.md): its processes
 * cannot reach abstract Unix sockets made outside it (the host's, other slivers')
 * nor signal processes outside it (ABI 6 scopes). With a guard, TCP binds are also
 * handled with no rule: only the agent, outside the domain, binds for the sliver
 * (defence in depth; without a guard the sliver must keep binding itself). */
static void landlock_scope(int with_guard)
{
	struct { uint64_t handled_access_fs, handled_access_net, scoped; } attr = {
		0,
		with_guard ? 1 /* LANDLOCK_ACCESS_NET_BIND_TCP */ : 0,
		3 /* LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | LANDLOCK_SCOPE_SIGNAL */,
	};
	int rs = (int)syscall(444 /* landlock_create_ruleset */, &attr, sizeof attr, 0);
	if (rs < 0)
		die("landlock_create_ruleset (scopes need Landlock ABI 6, kernel 6.12+)", errno);
	if (syscall(446 /* landlock_restrict_self */, rs, 0) < 0)
		die("landlock_restrict_self", errno);
	close(rs);
}

/* Read the filter, install it with a listener, send the listener (and `sockd_req`,
 * the agent's end of sockd's request socket, when >= 0) to the agent and keep our
 * own copy at GUARD_FD. Returns the listener (-1 without a sink); dies on failure. */
static int install_guard(int filter_fd, int sink, int sockd_req)
{
	/* mmap'd and unmapped after use, so no init keeps 32 KiB for it. */
	struct sock_filter *insns = mmap(NULL, BPF_MAXINSNS * sizeof *insns,
					 PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	const size_t cap = BPF_MAXINSNS * sizeof *insns;
	size_t got = 0;
	if (insns == MAP_FAILED)
		die("map guard filter buffer", errno);
	for (;;) {
		ssize_t n = read(filter_fd, (char *)insns + got, cap - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			die("read guard filter", errno);
		if (n == 0)
			break;
		got += (size_t)n;
		if (got == cap)
			die("read guard filter (more than BPF_MAXINSNS)", E2BIG);
	}
	close(filter_fd);
	if (got == 0 || got % sizeof(struct sock_filter))
		die("read guard filter (size not a multiple of 8)", EINVAL);
	struct sock_fprog prog = { .len = (unsigned short)(got / sizeof(struct sock_filter)), .filter = insns };
	/* Without a sink the filter only hardens (it must notify nothing): no listener. */
	int lis = (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER,
			       sink >= 0 ? SECCOMP_FILTER_FLAG_NEW_LISTENER : 0, &prog);
	if (lis < 0)
		die("install seccomp filter", errno);
	munmap(insns, cap);
	if (sink < 0)
		return -1;
	char byte = 'L';
	int fds[2] = { lis, sockd_req };
	size_t nfds = sockd_req >= 0 ? 2 : 1;
	struct iovec iov = { .iov_base = &byte, .iov_len = 1 };
	union { struct cmsghdr h; char buf[CMSG_SPACE(2 * sizeof(int))]; } cm;
	memset(&cm, 0, sizeof cm);
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1,
			     .msg_control = cm.buf, .msg_controllen = CMSG_SPACE(nfds * sizeof(int)) };
	struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
	memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
	if (sendmsg(sink, &mh, MSG_NOSIGNAL) != 1)
		die("send guard listener", errno);
	close(sink);
	move_fd(lis, GUARD_FD, "keep guard listener");
	return GUARD_FD;
}

/* ---- service ---- */

struct job {
	int conn;   /* -1 once the client went away */
	pid_t pid;
};

static struct job *jobs;
static size_t njobs, capjobs;

static void send_reply(int conn, int type, int value, const char *msg, int fd)
{
	struct reply r;
	memset(&r, 0, sizeof r);
	r.type = type;
	r.value = value;
	if (msg)
		snprintf(r.msg, sizeof r.msg, "%s", msg);
	struct iovec iov = { .iov_base = &r, .iov_len = sizeof r };
	union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int))]; } cm;
	memset(&cm, 0, sizeof cm);
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
	if (fd >= 0) {
		mh.msg_control = cm.buf;
		mh.msg_controllen = sizeof cm.buf;
		struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &fd, sizeof(int));
	}
	/* A client that left is not an error for the init. */
	(void)sendmsg(conn, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
}

struct user {
	uid_t uid;
	gid_t gid;
	char home[256], shell[256];
	gid_t groups[MAX_GROUPS];
	int ngroups;
};

#define ACCOUNT_FILE_MAX (4u << 20)

/* Open a file of the sliver that the init reads itself: it must never block on it
 * (a FIFO or a device planted there would wedge the init for good, F40), so it is
 * opened non-blocking, and only a regular file of at most ACCOUNT_FILE_MAX bytes is
 * read. NULL with errno set otherwise. */
static FILE *open_sliver_file(const char *path)
{
	struct stat st;
	int fd = open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
	if (fd < 0)
		return NULL;
	int bad = fstat(fd, &st) < 0 ? errno : !S_ISREG(st.st_mode) ? EINVAL :
		  st.st_size > ACCOUNT_FILE_MAX ? EFBIG : 0;
	if (bad) {
		int err = bad;
		close(fd);
		errno = err;
		return NULL;
	}
	FILE *f = fdopen(fd, "r");
	if (!f) {
		int err = errno;
		close(fd);
		errno = err;
	}
	return f;
}

/* A uid or gid field: 1 to 10 ASCII digits, below 2^32-1 (strtoul would take "",
 * "-1", " 7" or a number that wraps). */
static int parse_id(const char *s, unsigned int *out)
{
	unsigned long long v = 0;
	size_t n = strlen(s);
	if (n == 0 || n > 10)
		return -1;
	for (size_t i = 0; i < n; i++) {
		if (s[i] < '0' || s[i] > '9')
			return -1;
		v = v * 10 + (unsigned)(s[i] - '0');
	}
	if (v >= 0xffffffffULL)
		return -1;
	*out = (unsigned int)v;
	return 0;
}

/* Look `name` up in the sliver's /etc/passwd and /etc/group (no NSS: static). */
static int lookup_user(const char *name, struct user *u)
{
	char line[1024];
	int found = 0;
	FILE *f = open_sliver_file("/etc/passwd");
	if (!f)
		return errno;
	while (!found && fgets(line, sizeof line, f)) {
		char *fld[7];
		int n = 0;
		char *p = line;
		line[strcspn(line, "\n")] = 0;
		for (; n < 7; n++) {
			fld[n] = strsep(&p, ":");
			if (!fld[n])
				break;
		}
		if (n == 7 && strcmp(fld[0], name) == 0) {
			unsigned int uid, gid;
			if (parse_id(fld[2], &uid) < 0 || parse_id(fld[3], &gid) < 0) {
				fclose(f);
				return EINVAL;   /* the user's entry is malformed */
			}
			u->uid = (uid_t)uid;
			u->gid = (gid_t)gid;
			snprintf(u->home, sizeof u->home, "%s", fld[5][0] ? fld[5] : "/");
			snprintf(u->shell, sizeof u->shell, "%s", fld[6][0] ? fld[6] : "/bin/sh");
			found = 1;
		}
	}
	fclose(f);
	if (!found)
		return ENOENT;
	u->groups[0] = u->gid;
	u->ngroups = 1;
	f = open_sliver_file("/etc/group");
	if (!f)
		return 0;
	while (u->ngroups < MAX_GROUPS && fgets(line, sizeof line, f)) {
		char *p = line, *gname, *gid;
		line[strcspn(line, "\n")] = 0;
		gname = strsep(&p, ":");
		(void)strsep(&p, ":");
		gid = strsep(&p, ":");
		if (!gname || !gid || !p)
			continue;
		for (char *m; (m = strsep(&p, ",")) != NULL;)
			if (strcmp(m, name) == 0) {
				unsigned int g;
				if (parse_id(gid, &g) < 0)
					break;
				if (g != u->gid)
					u->groups[u->ngroups++] = g;
				break;
			}
	}
	fclose(f);
	return 0;
}

#define EXEC_DEADLINE_MS 10000

/* Up to `len` bytes from `fd` until its end or `ms` milliseconds (ms < 0: no deadline;
 * the fd's own timeout, if any, still applies): the count, -1 on an error, -2 when the
 * deadline passed first. */
static ssize_t read_deadline(int fd, void *buf, size_t len, int ms)
{
	struct timespec t0, now;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	size_t got = 0;
	while (got < len) {
		if (ms >= 0) {
			clock_gettime(CLOCK_MONOTONIC, &now);
			long left = ms - ((now.tv_sec - t0.tv_sec) * 1000 +
					  (now.tv_nsec - t0.tv_nsec) / 1000000);
			if (left <= 0)
				return -2;
			struct pollfd p = { fd, POLLIN, 0 };
			int r = poll(&p, 1, (int)left);
			if (r < 0 && errno == EINTR)
				continue;
			if (r < 0)
				return -1;
			if (r == 0)
				return -2;
		}
		ssize_t n = read(fd, (char *)buf + got, len - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return n < 0 ? -1 : (ssize_t)got;
		got += (size_t)n;
	}
	return (ssize_t)got;
}

static ssize_t read_full(int fd, void *buf, size_t len)
{
	return read_deadline(fd, buf, len, -1);
}

/* In the forked child: become the user, wire stdio, exec. Writes errno and exits
 * on failure (errpipe is close-on-exec, so a successful exec closes it silently). */
/* A process the init starts is a likelier OOM victim than the init (and sockd): the
 * sliver's memory cgroup at its limit with memory no process owns (socket buffers,
 * tmpfs) made the OOM killer take the init, whose rss was the largest left, and the
 * whole sliver died with it. The init keeps an fd of its own oom_score_adj, opened
 * during setup while no process of the sliver existed (a non-dumpable task's /proc
 * files belong to the node's root: it was dumpable for that open only), and writes
 * floor + CHILD_OOM_STEP through it for the moment of each fork: the child inherits
 * that value, the init goes back to the floor. Writes through an open fd check only
 * the floor (oom_score_adj_min), so neither needs privilege. A started process may
 * lower its value again, down to the floor: its own choice. */
#define CHILD_OOM_STEP 100
static int oom_fd = -1;
static char oom_floor[24], oom_child[24];

static void open_own_oom_score_adj(void)
{
	if (prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) < 0)
		die("make the init dumpable to open its oom_score_adj", errno);
	int fd = open("/proc/self/oom_score_adj", O_RDWR | O_CLOEXEC);
	int err = errno;
	non_dumpable("make the init non-dumpable");
	if (fd < 0)
		die("open own oom_score_adj", err);
	ssize_t n = pread(fd, oom_floor, sizeof oom_floor - 1, 0);
	if (n <= 0)
		die("read own oom_score_adj", n < 0 ? errno : EINVAL);
	oom_floor[n] = 0;
	long adj = strtol(oom_floor, NULL, 10);
	snprintf(oom_floor, sizeof oom_floor, "%ld", adj);
	snprintf(oom_child, sizeof oom_child, "%ld", adj + CHILD_OOM_STEP > 1000 ? 1000 :
		 adj + CHILD_OOM_STEP);
	oom_fd = fd;
}

/* The init's oom_score_adj: its children's (raise) or its own (back to the floor). */
static void set_oom_score_adj(int raise)
{
	const char *v = raise ? oom_child : oom_floor;
	if (oom_fd >= 0)
		(void)!pwrite(oom_fd, v, strlen(v), 0);
}

static void child_exec(int errpipe, const struct user *u, const char *cwd, char **argv,
		       char **envp, const int *fds, int nfds, const char *pts)
{
	int err;
	const char *step;
	sigset_t none;
	if (oom_fd >= 0)
		close(oom_fd);   /* the init's own (close-on-exec too) */
	/* The init only blocks SIGCHLD (for its signalfd) and installs no handler,
	 * so the default dispositions are already in place: unblock, nothing else. */
	sigemptyset(&none);
	step = "unblock signals";
	if (sigprocmask(SIG_SETMASK, &none, NULL) < 0)
		goto fail;
	step = "setsid";
	if (setsid() < 0)
		goto fail;
	if (pts) {
		step = "open pty";
		int slave = open(pts, O_RDWR | O_NOCTTY);
		if (slave < 0)
			goto fail;
		step = "chown pty";
		if (fchown(slave, u->uid, (gid_t)-1) < 0)
			goto fail;
		step = "set controlling tty";
		if (ioctl(slave, TIOCSCTTY, 0) < 0)
			goto fail;
		step = "dup pty";
		for (int i = 0; i < 3; i++)
			if (dup2(slave, i) < 0)
				goto fail;
		if (slave > 2)
			close(slave);
	} else if (nfds == 3) {
		step = "dup stdio";
		for (int i = 0; i < 3; i++)
			if (dup2(fds[i], i) < 0)
				goto fail;
	} else {
		step = "open /dev/null";
		int nul = open("/dev/null", O_RDWR);
		if (nul < 0)
			goto fail;
		for (int i = 0; i < 3; i++)
			if (dup2(nul, i) < 0)
				goto fail;
	}
	step = "setgroups";
	if (setgroups((size_t)u->ngroups, u->groups) < 0)
		goto fail;
	step = "setresgid";
	if (setresgid(u->gid, u->gid, u->gid) < 0)
		goto fail;
	step = "setresuid";
	if (setresuid(u->uid, u->uid, u->uid) < 0)
		goto fail;
	/* The id change set "dumpable" to fs.suid_dumpable: with 1 this copy of the init
	 * (its fds until the exec, its memory) was open to the user it became (F42). */
	step = "make the child non-dumpable";
	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
		goto fail;
	step = "chdir";
	if (chdir(cwd ? cwd : u->home) < 0 && (cwd || chdir("/") < 0))
		goto fail;
	environ = envp;
	step = "exec";
	execvp(argv[0], argv);
fail:
	err = errno;
	(void)!write(errpipe, &err, sizeof err);
	(void)!write(errpipe, step, strlen(step) + 1);
	_exit(127);
}

static void handle_request(int conn)
{
	struct req_hdr h;
	int fds[3] = {-1, -1, -1}, nfds = 0, master = -1;
	/* argv/envp live on the heap, sized to the request: a 64 KiB array on the
	 * stack would stay resident in every init after its first request. */
	char *buf = NULL, **argv = NULL, **envp = NULL;
	int argc = 0, envc = 0;
	const char *user = "root", *cwd = NULL;
	const char *emsg = "read request";
	int err = EPROTO;
	char pts[64];
	struct timeval tv = { .tv_sec = 5 };   /* a stuck client must not stall the init */
	if (setsockopt(conn, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0) {
		send_reply(conn, R_ERROR, errno, "set request timeout", -1);
		close(conn);
		return;
	}

	struct iovec iov = { .iov_base = &h, .iov_len = sizeof h };
	union { struct cmsghdr c; char b[CMSG_SPACE(3 * sizeof(int))]; } cm;
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1,
			     .msg_control = cm.b, .msg_controllen = sizeof cm.b };
	ssize_t n = recvmsg(conn, &mh, MSG_CMSG_CLOEXEC | MSG_WAITALL);
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
			int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
			for (int i = 0; i < k; i++) {
				int fd;
				memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
				if (nfds < 3)
					fds[nfds++] = fd;
				else
					close(fd);
			}
		}
	if (n != (ssize_t)sizeof h || h.magic != REQ_MAGIC || h.len > REQ_MAX ||
	    (nfds != 0 && nfds != 3))
		goto bad;
	buf = malloc(h.len + 1);
	if (!buf) {
		err = ENOMEM;
		goto bad;
	}
	if (read_full(conn, buf, h.len) != (ssize_t)h.len)
		goto bad;
	buf[h.len] = 0;
	size_t nstr = 0;
	for (char *p = buf; p < buf + h.len; p += strlen(p) + 1)
		nstr++;
	argv = calloc(nstr + 2, sizeof *argv);
	envp = calloc(nstr + 8, sizeof *envp);
	if (!argv || !envp) {
		err = ENOMEM;
		goto bad;
	}
	for (char *p = buf; p < buf + h.len; p += strlen(p) + 1) {
		switch (*p) {
		case 'u': user = p + 1; break;
		case 'c': cwd = p + 1; break;
		case 'a': if (argc < MAX_ARGS) argv[argc++] = p + 1; else goto bad; break;
		case 'e': if (envc < MAX_ARGS) envp[envc++] = p + 1; else goto bad; break;
		default: goto bad;
		}
	}
	struct user u;
	emsg = "look up user";
	if ((err = lookup_user(user, &u)) != 0)
		goto bad;
	if (argc == 0)
		argv[argc++] = u.shell;
	argv[argc] = NULL;
	if (envc == 0) {
		static char e[5][300];
		snprintf(e[0], sizeof e[0], "HOME=%s", u.home);
		snprintf(e[1], sizeof e[1], "USER=%s", user);
		snprintf(e[2], sizeof e[2], "LOGNAME=%s", user);
		snprintf(e[3], sizeof e[3], "SHELL=%s", u.shell);
		envp[envc++] = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
		for (int i = 0; i < 4; i++)
			envp[envc++] = e[i];
		if (h.flags & REQ_TTY)
			envp[envc++] = "TERM=xterm";
	}
	envp[envc] = NULL;
	if (h.flags & REQ_TTY) {
		unsigned int ptn, unlock = 0;
		emsg = "open /dev/ptmx";
		/* The devpts' own node, not /dev/ptmx: the sliver may replace that link
		 * (with a FIFO, say); non-blocking, then blocking again for the client. */
		master = open("/dev/pts/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
		struct stat mst;
		if (master >= 0 && (fstat(master, &mst) < 0 || !S_ISCHR(mst.st_mode))) {
			close(master);
			master = -1;
			errno = ENOTTY;
		}
		if (master >= 0 && fcntl(master, F_SETFL, O_RDWR) < 0) {
			close(master);
			master = -1;
		}
		if (master < 0 || ioctl(master, TIOCSPTLCK, &unlock) < 0 ||
		    ioctl(master, TIOCGPTN, &ptn) < 0) {
			err = errno;
			goto bad;
		}
		struct winsize ws = { .ws_row = h.rows ? h.rows : 24, .ws_col = h.cols ? h.cols : 80 };
		(void)ioctl(master, TIOCSWINSZ, &ws);
		snprintf(pts, sizeof pts, "/dev/pts/%u", ptn);
	}
	int ep[2];
	emsg = "pipe";
	if (pipe2(ep, O_CLOEXEC) < 0) {
		err = errno;
		goto bad;
	}
	set_oom_score_adj(1);   /* inherited by the child (see CHILD_OOM_STEP) */
	pid_t pid = fork();
	if (pid == 0) {
		close(ep[0]);
		child_exec(ep[1], &u, cwd, argv, envp, fds, nfds, master >= 0 ? pts : NULL);
	}
	int fork_errno = errno;
	set_oom_score_adj(0);
	close(ep[1]);
	if (pid < 0) {
		err = fork_errno;
		emsg = "fork";
		close(ep[0]);
		goto bad;
	}
	char ebuf[sizeof(int) + 64];
	/* Bounded: a child stopped before its exec (the sliver's root can SIGSTOP every
	 * process it may signal) must not keep the init from serving and reaping. */
	ssize_t en = read_deadline(ep[0], ebuf, sizeof ebuf, EXEC_DEADLINE_MS);
	close(ep[0]);
	if (en == -2) {
		kill(pid, SIGKILL);   /* reaped by the loop, as a failed exec is */
		for (int i = 0; i < nfds; i++)
			close(fds[i]);
		nfds = 0;
		send_reply(conn, R_ERROR, ETIMEDOUT, "start (the process was stopped before "
			   "its exec)", -1);
		goto out;
	}
	for (int i = 0; i < nfds; i++)
		close(fds[i]);
	nfds = 0;
	if (en >= (ssize_t)sizeof(int)) {
		/* exec failed; the child exits 127 and is reaped by the loop. */
		memcpy(&err, ebuf, sizeof err);
		ebuf[sizeof ebuf - 1] = 0;
		send_reply(conn, R_ERROR, err, ebuf + sizeof(int), -1);
		goto out;
	}
	if (njobs == capjobs) {
		size_t nc = capjobs ? capjobs * 2 : 8;
		struct job *nj = realloc(jobs, nc * sizeof *nj);
		if (!nj) {
			kill(pid, SIGKILL);
			err = ENOMEM;
			emsg = "track job";
			goto bad;
		}
		jobs = nj;
		capjobs = nc;
	}
	jobs[njobs].conn = conn;
	jobs[njobs].pid = pid;
	njobs++;
	send_reply(conn, R_STARTED, pid, NULL, master);
	if (master >= 0)
		close(master);
	free(buf);
	free(argv);
	free(envp);
	return;
bad:
	send_reply(conn, R_ERROR, err, emsg, -1);
out:
	for (int i = 0; i < nfds; i++)
		close(fds[i]);
	if (master >= 0)
		close(master);
	free(buf);
	free(argv);
	free(envp);
	close(conn);
}

static void reap(void)
{
	int status;
	pid_t pid;
	while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
		for (size_t i = 0; i < njobs; i++) {
			if (jobs[i].pid != pid)
				continue;
			if (jobs[i].conn >= 0) {
				send_reply(jobs[i].conn, R_EXITED, status, NULL, -1);
				close(jobs[i].conn);
			}
			jobs[i] = jobs[--njobs];
			break;
		}
	}
}

/* A client of a running job sent something: a signal number, or it left. */
static void client_input(struct job *j)
{
	int32_t sig;
	ssize_t n = recv(j->conn, &sig, sizeof sig, MSG_DONTWAIT);
	if (n == (ssize_t)sizeof sig) {
		if (sig > 0 && sig < NSIG)
			kill(j->pid, sig);
		return;
	}
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	close(j->conn);   /* gone (or spoke nonsense): the job runs on unattended */
	j->conn = -1;
}

static void serve(void)
{
	sigset_t mask;
	sigemptyset(&mask);
	sigaddset(&mask, SIGCHLD);
	if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0)
		die("block SIGCHLD", errno);
	int sfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
	if (sfd < 0)
		die("signalfd", errno);
	say("ready\n");
	close(sync_fd);
	sync_fd = -1;
	struct pollfd *pfd = NULL;
	size_t cap = 0;
	for (;;) {
		if (cap < njobs + 2) {
			cap = njobs + 16;
			struct pollfd *np = realloc(pfd, cap * sizeof *np);
			if (!np) {   /* keep reaping at least */
				reap();
				sleep(1);
				continue;
			}
			pfd = np;
		}
		pfd[0] = (struct pollfd){ .fd = sfd, .events = POLLIN };
		pfd[1] = (struct pollfd){ .fd = CTL_FD, .events = POLLIN };
		for (size_t i = 0; i < njobs; i++)
			pfd[2 + i] = (struct pollfd){ .fd = jobs[i].conn, .events = POLLIN };
		size_t n = njobs + 2;
		if (poll(pfd, n, -1) < 0)
			continue;
		if (pfd[0].revents) {
			struct signalfd_siginfo si;
			while (read(sfd, &si, sizeof si) > 0)
				;
			reap();
		}
		for (size_t i = 2; i < n && i - 2 < njobs; i++)
			if (pfd[i].revents && jobs[i - 2].conn == pfd[i].fd)
				client_input(&jobs[i - 2]);
		if (pfd[1].revents & POLLIN) {
			int conn = accept4(CTL_FD, NULL, NULL, SOCK_CLOEXEC);
			if (conn >= 0)
				handle_request(conn);
		}
	}
}

/* Our arguments name host paths (the root, the cgroups): everyone in the sliver can
 * read them in /proc/1/cmdline. Once setup is done, overwrite the argument area with
 * "sliver-init --hostname=NAME", which the host's tools still find us by. Every
 * option pointing into that area must be used up before this. */
static void hide_host_arguments(int argc, char **argv, const char *hostname)
{
	char shown[300];
	int n = snprintf(shown, sizeof shown, "sliver-init%c--hostname=%s", '\0', hostname);
	char *start = argv[0], *end = argv[argc - 1] + strlen(argv[argc - 1]);
	if (n < 0 || (size_t)n >= sizeof shown || end - start < n)
		return;   /* nothing shorter to show: keep them (never happens in practice) */
	memset(start, 0, (size_t)(end - start));
	memcpy(start, shown, (size_t)n);
}

int main(int argc, char **argv)
{
	struct opts o;
	parse_opts(argc, argv, &o);
	/* Ignored signals and the signal mask survive exec: start the sliver from the
	 * defaults, whatever the caller had (its children inherit them from us). */
	sigset_t all;
	sigemptyset(&all);
	if (sigprocmask(SIG_SETMASK, &all, NULL) < 0)
		die("reset signal mask", errno);
	/* glibc's signal() refuses the two signals it reserves for itself (32 and 33),
	 * yet an ignored one of those survives exec too: reset every signal with the
	 * raw system call. The kernel's struct sigaction: handler, flags, restorer, mask. */
	struct { void *handler; unsigned long flags; void *restorer; uint64_t mask; } dfl = {0};
	for (int s = 1; s <= 64; s++)
		if (s != SIGKILL && s != SIGSTOP &&
		    syscall(SYS_rt_sigaction, s, &dfl, NULL, sizeof dfl.mask) < 0)
			die("reset signal dispositions", errno);
	/* Join the sliver's cgroups first (host root may), so that everything after,
	 * the namespaces included, is charged to them and the cgroup namespace is
	 * rooted there. */
	for (int i = 0; i < o.ncg; i++) {
		char path[4100], step[4200];
		snprintf(path, sizeof path, "%s/cgroup.procs", o.cgroups[i]);
		snprintf(step, sizeof step, "join cgroup %s", o.cgroups[i]);
		int fd = open(path, O_WRONLY | O_CLOEXEC);
		if (fd < 0 || write(fd, "0", 1) != 1)
			die(step, errno);
		close(fd);
	}
	/* The OOM killer takes a sliver before the node's own processes (F34). Written
	 * as host root (CAP_SYS_RESOURCE), it is also the floor no process of the
	 * sliver may go below (oom_score_adj_min); every process inherits it. */
	if (o.have_oom) {
		char v[16];
		int n = snprintf(v, sizeof v, "%d", o.oom_score_adj);
		int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
		if (fd < 0 || write(fd, v, (size_t)n) != n)
			die("set oom_score_adj", errno);
		close(fd);
	}
	/* Enter the root while still host root: the sliver's uids may not be allowed to
	 * traverse the directories above it. unshare(CLONE_NEWNS) below moves our cwd to
	 * the copy of this mount in the sliver's mount namespace. */
	if (chdir(o.root) < 0)
		die("chdir root", errno);
	/* rlimits too: raising a hard limit needs CAP_SYS_RESOURCE of the host. */
	for (int i = 0; i < o.nrl; i++)
		if (setrlimit(o.rl[i].res, &o.rl[i].rl) < 0)
			die(o.rl[i].name, errno);
	/* The kernel charges what is made in a user namespace (inotify instances, nested
	 * user and mount namespaces, ...) at the host level to the namespace's owner: the
	 * effective uid that creates it. Made as host root, every sliver would share
	 * root's budgets (and could exhaust them for root and all other slivers); made as
	 * the sliver's own base uid, each sliver has its own. SECBIT_NO_SETUID_FIXUP keeps
	 * our capabilities across the uid change (creating a user namespace may need
	 * CAP_SYS_ADMIN where unprivileged ones are restricted). */
	if (o.owner > 0) {
		if (prctl(PR_SET_SECUREBITS, SECBIT_NO_SETUID_FIXUP, 0, 0, 0) < 0)
			die("set SECBIT_NO_SETUID_FIXUP", errno);
		if (setresuid((uid_t)-1, (uid_t)o.owner, (uid_t)-1) < 0)
			die("set the user namespace's owner", errno);
	}
	if (unshare(CLONE_NEWUSER) < 0)
		die("unshare user namespace", errno);
	/* Securebits are inherited: none of ours may reach the sliver (with
	 * NO_SETUID_FIXUP a daemon dropping root inside would keep its capabilities). */
	if (o.owner > 0 && prctl(PR_SET_SECUREBITS, 0, 0, 0, 0) < 0)
		die("clear securebits", errno);
	say("userns\n");
	o.ctl = recv_ctl();
	if (setgroups(0, NULL) < 0)
		die("setgroups", errno);
	if (setresgid(0, 0, 0) < 0)
		die("setresgid 0", errno);
	if (setresuid(0, 0, 0) < 0)
		die("setresuid 0", errno);
	/* Never dumpable (F42): the init (and sockd, forked next) hold the guard's
	 * listener, sockd's request socket and the control socket. The kernel resets
	 * "dumpable" at every id change to fs.suid_dumpable, which a node may set to 1;
	 * then a sliver root given CAP_SYS_PTRACE could pidfd_getfd/ptrace its init.
	 * Set after the last id change of the init (none follows: see below). */
	non_dumpable("make the init non-dumpable");
	/* sockd (sockd.h, F38): the sliver's socket maker, in the node's network and
	 * PID namespaces, the sliver's user namespace and cgroups. */
	int sockd_chan[2], sockd_req[2];
	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sockd_chan) < 0 ||
	    socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sockd_req) < 0)
		die("socketpairs for sockd", errno);
	pid_t sockd = fork();
	if (sockd < 0)
		die("fork sockd", errno);
	if (sockd == 0) {
		close(sockd_chan[1]);
		close(sockd_req[1]);
		sockd_serve(sockd_chan[0], sockd_req[0]);
	}
	close(sockd_chan[0]);
	close(sockd_req[0]);
	sockd_started(sockd_chan[1], sockd);
	say("sockd %d\n", (int)sockd);
	if (unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWCGROUP |
		    CLONE_NEWNET) < 0)
		die("unshare mount/uts/ipc/pid/cgroup/net namespaces", errno);
	pid_t pid = fork();
	if (pid < 0)
		die("fork init", errno);
	if (pid > 0) {
		/* The launcher says nothing after the fork: the init alone reports "pid"
		 * then "ready", so their order cannot depend on when the launcher runs
		 * (it once reported "pid" itself, and a preempted launcher let "ready"
		 * arrive first). --launcher-delay-ms lets tests check exactly that. */
		if (o.launcher_delay_ms > 0) {
			struct timespec ts = { o.launcher_delay_ms / 1000,
					       (o.launcher_delay_ms % 1000) * 1000000L };
			while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
				;
		}
		_exit(0);
	}
	/* The init (PID 1 of the new PID namespace). It reports its host pid itself,
	 * so that "pid" always comes before "ready" on the sync socket: /proc is still
	 * the host's here, and /proc/self names us in the host's PID namespace. */
	char self[32];
	ssize_t sl = readlink("/proc/self", self, sizeof self - 1);
	if (sl <= 0)
		die("read host pid (/proc/self)", sl < 0 ? errno : EINVAL);
	self[sl] = 0;
	say("pid %s\n", self);
	open_own_oom_score_adj();   /* no process of the sliver exists yet */
	if (setsid() < 0)
		die("setsid", errno);
	setup_root(&o);
	if (sethostname(o.hostname, strlen(o.hostname)) < 0)
		die("sethostname", errno);
	drop_bounding_set(o.capbset);
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		die("set no_new_privs", errno);
	landlock_scope(o.guard_sink >= 0);
	/* Fix the fds: ctl at CTL_FD, guard at GUARD_FD, sync above them, nothing else. */
	int ctl = fcntl(o.ctl, F_DUPFD_CLOEXEC, 10);
	int sfd = fcntl(sync_fd, F_DUPFD_CLOEXEC, 10);
	int gf = o.guard_filter >= 0 ? fcntl(o.guard_filter, F_DUPFD_CLOEXEC, 10) : -1;
	int gs = o.guard_sink >= 0 ? fcntl(o.guard_sink, F_DUPFD_CLOEXEC, 10) : -1;
	int sc = fcntl(sockd_chan[1], F_DUPFD_CLOEXEC, 10);
	int sr = fcntl(sockd_req[1], F_DUPFD_CLOEXEC, 10);
	if (ctl < 0 || sfd < 0 || sc < 0 || sr < 0 || (o.guard_filter >= 0 && gf < 0) ||
	    (o.guard_sink >= 0 && gs < 0))
		die("duplicate fds", errno);
	close(sockd_chan[1]);
	close(sockd_req[1]);
	close(o.ctl);
	close(sync_fd);
	sync_fd = sfd;
	if (o.guard_filter >= 0)
		close(o.guard_filter);
	if (o.guard_sink >= 0)
		close(o.guard_sink);
	move_fd(ctl, CTL_FD, "place control socket");
	/* With a guard the one listener a filter chain may have is the agent's: the
	 * guard filter notifies socket() and the agent hands those to sockd, which gets
	 * a copy of the listener to answer them and its request socket's other end
	 * (kept at SOCKD_FD for a restarted agent). Without one sockd's own filter. */
	int glis = gf >= 0 ? install_guard(gf, gs, sr) : -1;
	if (glis >= 0) {
		sockd_send(sc, 'G', glis);
		move_fd(sr, SOCKD_FD, "keep sockd request socket");
	} else {
		close(sr);
		sockd_install(sc);
	}
	hide_host_arguments(argc, argv, o.hostname);
	non_dumpable("make the init non-dumpable");   /* again, whatever setup changed */
	serve();
	return 0;
}
