/* guard-supervisor: a minimal C seccomp supervisor, the reference for bench/guard.py.
 *
 *   guard-supervisor LISTENER_FD PORT [sync]
 *
 * For every bind notification it does the work the agent's guard does: a pidfd of
 * the caller's thread (cached per thread, as the agent caches them; reopened when
 * that task died), pidfd_getfd of its socket, process_vm_readv of the
 * sockaddr into its own buffer, SECCOMP_IOCTL_NOTIF_ID_VALID, a policy check (one
 * allowed port), bind on its copy, reply with the result. With "sync" it sets
 * SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP, as the agent does. Exits when no process is
 * left under the filter.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/seccomp.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef SECCOMP_IOCTL_NOTIF_SET_FLAGS
#define SECCOMP_IOCTL_NOTIF_SET_FLAGS 0x40082104
#endif
#ifndef SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP
#define SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP 1
#endif
#define PIDFD_THREAD O_EXCL
#define CACHE 256

static struct cached {
	unsigned pid;
	int pidfd;
} cache[CACHE];

static int handle(int lis, struct seccomp_notif *n, int port)
{
	int fdnum = (int)n->data.args[0];
	size_t len = (size_t)(unsigned)n->data.args[2];
	unsigned char addr[128];
	if (len > sizeof addr)
		return EINVAL;
	struct cached *c = &cache[n->pid % CACHE];
	int fd = -1;
	for (int fresh = 0; fresh < 2; fresh++) {
		if (c->pid != n->pid || c->pidfd < 0) {
			if (c->pidfd >= 0)
				close(c->pidfd);
			c->pid = n->pid;
			c->pidfd = (int)syscall(SYS_pidfd_open, n->pid, PIDFD_THREAD);
			if (c->pidfd < 0)
				return ESRCH;
			fresh = 1;
		}
		fd = (int)syscall(SYS_pidfd_getfd, c->pidfd, fdnum, 0);
		if (fd >= 0)
			break;
		int err = errno;
		close(c->pidfd);
		c->pidfd = -1;
		if (err != ESRCH || fresh)
			return err;
	}
	if (fd < 0)
		return ESRCH;
	int err = 0;
	struct iovec local = { addr, len }, remote = { (void *)n->data.args[1], len };
	if (process_vm_readv(n->pid, &local, 1, &remote, 1, 0) != (ssize_t)len)
		err = EFAULT;
	else if (ioctl(lis, SECCOMP_IOCTL_NOTIF_ID_VALID, &n->id) < 0)
		err = ESRCH;
	else if (len < sizeof(struct sockaddr_in) ||
		 ((struct sockaddr_in *)addr)->sin_family != AF_INET)
		err = EINVAL;
	else if (ntohs(((struct sockaddr_in *)addr)->sin_port) != port)
		err = EACCES;
	else if (bind(fd, (struct sockaddr *)addr, (socklen_t)len) < 0)
		err = errno;
	close(fd);
	return err;
}

int main(int argc, char **argv)
{
	if (argc < 3)
		return 2;
	int lis = atoi(argv[1]), port = atoi(argv[2]);
	for (int i = 0; i < CACHE; i++)
		cache[i].pidfd = -1;
	if (argc > 3 && strcmp(argv[3], "sync") == 0 &&
	    ioctl(lis, SECCOMP_IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP) < 0) {
		perror("guard-supervisor: SET_FLAGS");
		return 1;
	}
	struct seccomp_notif n;
	struct seccomp_notif_resp r;
	for (;;) {
		struct pollfd p = { lis, POLLIN, 0 };
		if (poll(&p, 1, -1) < 0) {
			if (errno == EINTR)
				continue;
			return 1;
		}
		if (!(p.revents & POLLIN)) {
			if (p.revents & (POLLHUP | POLLERR | POLLNVAL))
				return 0;
			continue;
		}
		memset(&n, 0, sizeof n);
		if (ioctl(lis, SECCOMP_IOCTL_NOTIF_RECV, &n) < 0) {
			if (errno == ENOENT || errno == EINTR)
				continue;
			return 1;
		}
		memset(&r, 0, sizeof r);
		r.id = n.id;
		r.error = n.data.nr == SYS_bind ? -handle(lis, &n, port) : -ENOSYS;
		if (ioctl(lis, SECCOMP_IOCTL_NOTIF_SEND, &r) < 0 && errno != ENOENT)
			return 1;
	}
}
