/* Attacker probe run inside a sliver by tests/kernel/test_fdtheft.py (static: the
 * busybox root has no libc). It tries every way a process of the sliver could take
 * a file descriptor of another process (the sliver init holds the seccomp guard's
 * listener at fd 4 and sockd's request socket at fd 5; sockd holds a copy of the
 * listener), and prints one line per attempt: "NAME ok" or "NAME E<errno>".
 *
 *   fdthief PID FD...   every attempt against PID (as seen in the sliver), each FD
 *   fdthief scan        the pids of the sliver's /proc, and any process whose fds
 *                       or comm this process can see as a seccomp listener or sockd
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif
#ifndef SYS_kcmp
#define SYS_kcmp 312
#endif

static void result(const char *name, long r)
{
	if (r < 0)
		printf("%s E%d\n", name, errno);
	else
		printf("%s ok\n", name);
}

static void attack(pid_t pid, int nfd, char **fdv)
{
	char name[128], path[128], buf[256];
	long r;
	int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
	result("pidfd_open", pidfd);
	for (int i = 0; i < nfd; i++) {
		int fd = atoi(fdv[i]);
		snprintf(name, sizeof name, "pidfd_getfd/%d", fd);
		r = pidfd >= 0 ? syscall(SYS_pidfd_getfd, pidfd, fd, 0) : (errno = EBADF, -1);
		result(name, r);
		snprintf(path, sizeof path, "/proc/%d/fd/%d", (int)pid, fd);
		snprintf(name, sizeof name, "open_proc_fd/%d", fd);
		result(name, open(path, O_RDWR));
		snprintf(name, sizeof name, "readlink_proc_fd/%d", fd);
		result(name, readlink(path, buf, sizeof buf));
		snprintf(name, sizeof name, "kcmp/%d", fd);
		result(name, syscall(SYS_kcmp, getpid(), pid, 0 /* KCMP_FILE */, 0, fd));
	}
	snprintf(path, sizeof path, "/proc/%d/fd", (int)pid);
	DIR *d = opendir(path);
	result("opendir_proc_fd", d ? 0 : -1);
	if (d)
		closedir(d);
	snprintf(path, sizeof path, "/proc/%d/mem", (int)pid);
	result("open_proc_mem", open(path, O_RDWR));
	snprintf(path, sizeof path, "/proc/%d/environ", (int)pid);
	result("open_proc_environ", open(path, O_RDONLY));
	/* process_vm_readv of the init's stack area: any address gives EPERM first. */
	char one;
	struct iovec l = { &one, 1 }, rm = { (void *)0x400000, 1 };
	r = syscall(SYS_process_vm_readv, pid, &l, 1, &rm, 1, 0);
	result("process_vm_readv", r);
	r = syscall(SYS_process_vm_writev, pid, &l, 1, &rm, 1, 0);
	result("process_vm_writev", r);
	r = ptrace(PTRACE_SEIZE, pid, 0, 0);
	result("ptrace_seize", r);
	if (r == 0)
		ptrace(PTRACE_DETACH, pid, 0, 0);
	r = ptrace(PTRACE_ATTACH, pid, 0, 0);
	result("ptrace_attach", r);
	if (r == 0) {
		waitpid(pid, NULL, __WALL);
		ptrace(PTRACE_DETACH, pid, 0, 0);
	}
}

/* Every pid visible, then any seccomp listener or sockd among them. */
static void scan(void)
{
	DIR *d = opendir("/proc");
	struct dirent *e;
	char path[300], buf[256];
	if (!d) {
		printf("scan E%d\n", errno);
		return;
	}
	while ((e = readdir(d)) != NULL) {
		if (e->d_name[0] < '0' || e->d_name[0] > '9')
			continue;
		printf("pid %s\n", e->d_name);
		snprintf(path, sizeof path, "/proc/%s/comm", e->d_name);
		int c = open(path, O_RDONLY);
		if (c >= 0) {
			ssize_t n = read(c, buf, sizeof buf - 1);
			close(c);
			if (n > 0) {
				buf[n] = 0;
				if (strstr(buf, "sockd"))
					printf("sockd %s\n", e->d_name);
			}
		}
		snprintf(path, sizeof path, "/proc/%s/fd", e->d_name);
		DIR *f = opendir(path);
		if (!f)
			continue;
		struct dirent *g;
		while ((g = readdir(f)) != NULL) {
			char link[600];
			snprintf(link, sizeof link, "%s/%s", path, g->d_name);
			ssize_t n = readlink(link, buf, sizeof buf - 1);
			if (n > 0) {
				buf[n] = 0;
				if (strstr(buf, "seccomp"))
					printf("listener %s/%s\n", e->d_name, g->d_name);
			}
		}
		closedir(f);
	}
	closedir(d);
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc >= 2 && !strcmp(argv[1], "scan")) {
		scan();
		return 0;
	}
	if (argc < 2) {
		fprintf(stderr, "usage: fdthief PID FD... | scan\n");
		return 2;
	}
	attack((pid_t)atoi(argv[1]), argc - 2, argv + 2);
	return 0;
}
