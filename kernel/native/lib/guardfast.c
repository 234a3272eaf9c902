/* libguardfast: the bind fast path of the syscall guard, called from the agent's loop.
 *
 * The agent's guard (agent/guard.py) decides every notified bind with its port table
 * and performs it itself on a copy of the caller's socket. Doing that sequence of
 * syscalls from Python costs more than the policy does, so this library replays, in
 * C, decisions the Python guard has already made: the guard hands it the exact keys it
 * allowed (socket family, type and protocol, and the sockaddr bytes), and
 * gf_run() answers every pending notification whose key is one of those by doing what
 * the Python guard would do (pidfd_getfd, process_vm_readv into its own buffer,
 * SECCOMP_IOCTL_NOTIF_ID_VALID, bind of its own copy of the bytes, reply). Keys the
 * guard refused are remembered with their errno too, and answered with it (F36: a
 * slice looping on a refused bind costs the agent the C path, not Python's). Anything
 * else (another syscall, an unknown key, any error, a failed bind) is handed back to
 * Python untouched apart from the journal: the library never answers CONTINUE and
 * holds no policy of its own, so the Python guard stays the one place where binds are
 * decided.
 *
 * The caller empties the memo (gf_forget) whenever the port table changes; it is
 * called with the interpreter lock held (ctypes.PyDLL) from the one thread that
 * changes the table, so no change can land in the middle of a gf_run.
 *
 * gf_run() does not wait for notifications: it polls the listener with a zero timeout
 * and returns when nothing is pending, when Python must answer a notification, or
 * after `budget` notifications, so the agent's event loop keeps its turn. (A bind can
 * still wait briefly on its socket's lock, as it would in Python.)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#define GF_ADDR_MAX 128 /* agent.guard.SOCKADDR_MAX */
#define GF_MEMO 64	/* keys kept per listener, replaced round-robin */
#define GF_PIDFDS 8	/* caller thread pidfds kept per listener, by tid */
#ifndef PIDFD_THREAD
#define PIDFD_THREAD O_EXCL
#endif

/* gf_run's status, in the low 3 bits of its result; the number answered is above. */
enum {
	GF_IDLE = 0,	/* nothing pending: wait for the listener to be readable */
	GF_PYTHON = 1,	/* a notification for Python is in the `out` buffer */
	GF_GONE = 2,	/* no process is left under the filter */
	GF_YIELD = 3,	/* budget used up; more may be pending */
	GF_RECV_ERR = 4, /* SECCOMP_IOCTL_NOTIF_RECV failed: gf_errno() says why */
	GF_SEND_ERR = 5, /* a reply failed (not ENOENT): gf_errno() says why */
};

struct gf_key {
	int family, type, protocol;
	int answer; /* 0: bind it; > 0: refuse with this errno (as Python did) */
	unsigned len;
	unsigned char addr[GF_ADDR_MAX];
};

struct gf {
	int listener;
	struct {
		int tid;   /* a caller thread */
		int pidfd; /* its pidfd, or -1 */
	} pidfds[GF_PIDFDS];
	int err;	 /* errno of the last GF_*_ERR */
	long refused;	 /* requests answered with an error from the memo, ever */
	int exits;	 /* the caller's epoll set of pidfds, or -1 (see caller_fd) */
	unsigned char *slot; /* the journal slot (one struct seccomp_notif), or NULL */
	unsigned char *out;  /* where a notification for Python is copied */
	unsigned nmemo, next, cap;
	struct gf_key *memo;  /* grown on demand up to GF_MEMO: an idle listener costs little */
};

struct gf *gf_new(int listener, void *slot, void *out, int exits)
{
	struct gf *g = calloc(1, sizeof *g);
	if (!g)
		return NULL;
	g->listener = listener;
	for (int i = 0; i < GF_PIDFDS; i++)
		g->pidfds[i].pidfd = -1;
	g->slot = slot;
	g->out = out;
	g->exits = exits;
	return g;
}

/* Frees `g` and its cached pidfds; the listener is the caller's. */
void gf_free(struct gf *g)
{
	if (!g)
		return;
	for (int i = 0; i < GF_PIDFDS; i++)
		if (g->pidfds[i].pidfd >= 0)
			close(g->pidfds[i].pidfd);
	free(g->memo);
	free(g);
}

void gf_forget(struct gf *g)
{
	g->nmemo = 0;
	g->next = 0;
}

/* Close the kept pidfd `pidfd` (its thread exited); 1 if it was one of ours. */
int gf_drop_pidfd(struct gf *g, int pidfd)
{
	if (pidfd < 0)
		return 0;
	for (int i = 0; i < GF_PIDFDS; i++) {
		if (g->pidfds[i].pidfd == pidfd) {
			close(pidfd);
			g->pidfds[i].pidfd = -1;
			return 1;
		}
	}
	return 0;
}

int gf_errno(const struct gf *g)
{
	return g->err;
}

long gf_refused(const struct gf *g)
{
	return g->refused;
}

/* Answer binds of `addr` on sockets of this kind without asking Python again:
 * bind them (answer 0) or refuse them with errno `answer` (> 0), as Python did. */
int gf_remember(struct gf *g, int family, int type, int protocol, const void *addr,
		unsigned len, int answer)
{
	if (len == 0 || len > GF_ADDR_MAX || answer < 0)
		return -EINVAL;
	for (unsigned i = 0; i < g->nmemo; i++) {
		struct gf_key *k = &g->memo[i];
		if (k->family == family && k->type == type && k->protocol == protocol &&
		    k->len == len && memcmp(k->addr, addr, len) == 0) {
			k->answer = answer;
			return 0;
		}
	}
	if (g->next >= g->cap && g->cap < GF_MEMO) {
		unsigned cap = g->cap ? g->cap * 2 : 4;
		if (cap > GF_MEMO)
			cap = GF_MEMO;
		struct gf_key *bigger = realloc(g->memo, cap * sizeof *bigger);
		if (!bigger)
			return -ENOMEM;   /* not remembered: Python answers that key again */
		g->memo = bigger;
		g->cap = cap;
	}
	struct gf_key *k = &g->memo[g->next];
	memset(k, 0, sizeof *k);
	k->family = family;
	k->type = type;
	k->protocol = protocol;
	k->answer = answer;
	k->len = len;
	memcpy(k->addr, addr, len);
	g->next = (g->next + 1) % GF_MEMO;
	if (g->nmemo < GF_MEMO)
		g->nmemo++;
	return 0;
}

/* Whether any key has these sockaddr bytes (before the socket is even looked at). */
static int memo_has_addr(const struct gf *g, const unsigned char *addr, unsigned len)
{
	for (unsigned i = 0; i < g->nmemo; i++)
		if (g->memo[i].len == len && memcmp(g->memo[i].addr, addr, len) == 0)
			return 1;
	return 0;
}

/* The remembered answer for `key` (0 bind, > 0 errno), or -1: not known. */
static int memo_answer(const struct gf *g, const struct gf_key *key)
{
	for (unsigned i = 0; i < g->nmemo; i++) {
		const struct gf_key *k = &g->memo[i];
		if (k->len == key->len && k->family == key->family && k->type == key->type &&
		    k->protocol == key->protocol && memcmp(k->addr, key->addr, key->len) == 0)
			return k->answer;
	}
	return -1;
}

/* A copy of fd `fdnum` of thread `tid`. The pidfds of up to GF_PIDFDS caller threads
 * are kept, one slot per tid modulo GF_PIDFDS (a pidfd names one task for its life: a
 * dead one answers ESRCH, never a new task with the same tid). Each kept pidfd is in
 * the caller's epoll set `exits`, where it turns readable when its thread exits, so
 * that the caller has it closed (gf_drop_pidfd) rather than keep a dead thread's
 * pidfd; one that cannot be watched is not kept. */
static int caller_fd(struct gf *g, int tid, int fdnum)
{
	__typeof__(g->pidfds[0]) *c = &g->pidfds[(unsigned)tid % GF_PIDFDS];
	if (c->pidfd >= 0 && c->tid == tid) {
		int fd = (int)syscall(SYS_pidfd_getfd, c->pidfd, fdnum, 0);
		if (fd >= 0 || errno != ESRCH)
			return fd;
	}
	if (c->pidfd >= 0)
		close(c->pidfd);
	c->pidfd = -1;
	c->tid = tid;
	int pidfd = (int)syscall(SYS_pidfd_open, tid, PIDFD_THREAD);
	if (pidfd < 0)
		return -1;
	int fd = (int)syscall(SYS_pidfd_getfd, pidfd, fdnum, 0);
	struct epoll_event ev = { .events = EPOLLIN, .data.fd = pidfd };
	if (fd >= 0 && g->exits >= 0 && epoll_ctl(g->exits, EPOLL_CTL_ADD, pidfd, &ev) == 0)
		c->pidfd = pidfd;
	else
		close(pidfd);
	return fd;
}

/* The reply's errno for `n` when the memo answers it (0: allowed and bound), or -1:
 * Python must handle it. */
static int fast_bind(struct gf *g, const struct seccomp_notif *n)
{
	if (n->data.nr != SYS_bind || n->data.arch != AUDIT_ARCH_X86_64 || g->nmemo == 0)
		return -1;
	unsigned fdnum = (unsigned)n->data.args[0];
	unsigned len = (unsigned)n->data.args[2];
	if (fdnum >= 1u << 31 || len == 0 || len > GF_ADDR_MAX)
		return -1;
	struct gf_key key;
	key.len = len;
	struct iovec local = { key.addr, len };
	struct iovec remote = { (void *)(uintptr_t)n->data.args[1], len };
	if (process_vm_readv((pid_t)n->pid, &local, 1, &remote, 1, 0) != (ssize_t)len)
		return -1;
	if (!memo_has_addr(g, key.addr, len)) /* an unknown address: no fd taken at all */
		return -1;
	/* Bytes refused on every kind of socket (family 0 in the memo): refused without
	 * looking at the socket at all (a refusal needs no check of who asks, F36). */
	key.family = key.type = key.protocol = 0;
	int any = memo_answer(g, &key);
	if (any > 0) {
		g->refused++;
		return any;
	}
	int fd = caller_fd(g, (int)n->pid, (int)fdnum);
	if (fd < 0)
		return -1;
	int done = -1;
	socklen_t sl = sizeof(int);
	/* The bytes read and the fd copied are the caller's only if the caller is still
	 * the one waiting (the pid could have been reused before either). */
	if (ioctl(g->listener, SECCOMP_IOCTL_NOTIF_ID_VALID, &n->id) < 0)
		goto out;
	if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &key.family, &sl) < 0 ||
	    getsockopt(fd, SOL_SOCKET, SO_TYPE, &key.type, &sl) < 0 ||
	    getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &key.protocol, &sl) < 0)
		goto out;
	int answer = memo_answer(g, &key);
	if (answer > 0) { /* refused as Python refused this key under this table */
		g->refused++;
		done = answer;
	} else if (answer == 0 &&
		   /* Our own copy of the bytes: a caller rewriting them now changes nothing. */
		   bind(fd, (const struct sockaddr *)key.addr, len) == 0) {
		done = 0;
	}
out:
	close(fd);
	return done;
}

long gf_run(struct gf *g, int budget)
{
	long answered = 0;
	struct seccomp_notif n;
	/* Every round counts against the budget, answered or not (a caller that vanishes
	 * between poll and RECV, an EINTR), so one call is always bounded. */
	for (int round = 0;; round++) {
		if (round >= budget)
			return answered << 3 | GF_YIELD;
		struct pollfd p = { g->listener, POLLIN, 0 };
		int ready = poll(&p, 1, 0);
		if (ready < 0) {
			if (errno == EINTR)
				continue;
			g->err = errno;
			return answered << 3 | GF_RECV_ERR;
		}
		if (ready == 0)
			return answered << 3 | GF_IDLE;
		if (!(p.revents & POLLIN))
			return answered << 3 |
			       (p.revents & (POLLHUP | POLLERR | POLLNVAL) ? GF_GONE : GF_IDLE);
		memset(&n, 0, sizeof n); /* the kernel refuses a struct that is not zeroed */
		if (ioctl(g->listener, SECCOMP_IOCTL_NOTIF_RECV, &n) < 0) {
			if (errno == ENOENT || errno == EINTR) /* the caller went away */
				continue;
			g->err = errno;
			return answered << 3 | GF_RECV_ERR;
		}
		if (g->slot) /* journaled before anything is done (see agent/guard.py) */
			memcpy(g->slot, &n, sizeof n);
		int err = fast_bind(g, &n);
		if (err < 0) {
			memcpy(g->out, &n, sizeof n);
			return answered << 3 | GF_PYTHON;
		}
		struct seccomp_notif_resp r = { .id = n.id, .val = 0, .error = -err, .flags = 0 };
		answered++;
		if (ioctl(g->listener, SECCOMP_IOCTL_NOTIF_SEND, &r) < 0 && errno != ENOENT) {
			g->err = errno;
			return answered << 3 | GF_SEND_ERR;
		}
	}
}
