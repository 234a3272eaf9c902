/* guard-bindas: perform bind(2) on a socket as a given process would.
 *
 * The agent's guard performs guarded binds itself (it never lets a syscall
 * continue after reading the caller's memory). For IP sockets the agent binds
 * as root on purpose: the port table is the policy. For every other family
 * (a Unix socket path, netlink groups, ...) the caller's own view and
 * privileges must apply, so this helper takes them on first:
 *
 *   guard-bindas PID FD PIDFD [CGROUP-DIR...] < sockaddr-bytes
 *
 * FD: the socket, inherited. PIDFD: a pidfd of the caller (thread), inherited,
 * opened by the agent while the seccomp notification was still valid, so it is
 * the caller for sure. The caller is read through /proc/PID by number; if it
 * died and PID was reused meanwhile, that would be another process. So once
 * everything is read and opened, and before anything is taken on, the helper
 * checks that the pidfd's task is still alive (pidfd_send_signal with signal 0):
 * then PID cannot have changed hands in between, and /proc/PID was the caller.
 *
 * Steps, in order: open the caller's namespaces, root and cwd; check the pidfd; join its user
 * namespace (if different), then its mount namespace (after joining the cgroup
 * directories given as further arguments, the slice's: charged to it); chroot to its root and
 * chdir to its cwd; take its groups, gid and uid as seen inside its user
 * namespace, its capabilities and its umask; bind. Exit status: 0 on success, else the errno of
 * bind, or 125 when taking on the caller failed (the agent then denies).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#define FAIL 125
#define MAX_GROUPS 64
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif

static int open_proc(int pid, const char *what, int flags)
{
	char path[64];
	snprintf(path, sizeof path, "/proc/%d/%s", pid, what);
	return open(path, flags | O_CLOEXEC);
}

/* Map a host id to the id inside the caller's user namespace (uid_map/gid_map). */
static long map_id(int pid, const char *map, unsigned long host)
{
	char path[64], line[128];
	snprintf(path, sizeof path, "/proc/%d/%s", pid, map);
	FILE *f = fopen(path, "re");
	if (!f)
		return -1;
	long found = -1;
	while (fgets(line, sizeof line, f)) {
		unsigned long inside, outside, count;
		if (sscanf(line, "%lu %lu %lu", &inside, &outside, &count) == 3 &&
		    host >= outside && host - outside < count) {
			found = (long)(inside + (host - outside));
			break;
		}
	}
	fclose(f);
	return found;
}

static int same_ns(int pid, const char *ns)
{
	char a[64], b[64];
	struct stat sa, sb;
	snprintf(a, sizeof a, "/proc/%d/ns/%s", pid, ns);
	snprintf(b, sizeof b, "/proc/self/ns/%s", ns);
	if (stat(a, &sa) || stat(b, &sb))
		return -1;
	return sa.st_ino == sb.st_ino && sa.st_dev == sb.st_dev;
}

int main(int argc, char **argv)
{
	if (argc < 4)
		return FAIL;
	int pid = atoi(argv[1]), sock = atoi(argv[2]), pidfd = atoi(argv[3]);
	if (pid <= 0 || sock < 0 || pidfd < 0)
		return FAIL;
	unsigned char addr[128];
	ssize_t len = read(0, addr, sizeof addr);
	if (len < 0)
		return FAIL;

	/* The caller's credentials, from its status file (host ids). */
	char path[64], line[512];
	unsigned long uid = 0, gid = 0, umask_v = 022;
	unsigned long long cap_eff = 0, cap_prm = 0, cap_inh = 0;
	unsigned long groups[MAX_GROUPS];
	int ngroups = 0, have_uid = 0, have_gid = 0;
	snprintf(path, sizeof path, "/proc/%d/status", pid);
	FILE *st = fopen(path, "re");
	if (!st)
		return FAIL;
	while (fgets(line, sizeof line, st)) {
		unsigned long r, e, s, fs;
		if (sscanf(line, "Uid: %lu %lu %lu %lu", &r, &e, &s, &fs) == 4) {
			uid = fs;
			have_uid = 1;
		} else if (sscanf(line, "Gid: %lu %lu %lu %lu", &r, &e, &s, &fs) == 4) {
			gid = fs;
			have_gid = 1;
		} else if (sscanf(line, "Umask: %lo", &umask_v) == 1 ||
			   sscanf(line, "CapInh: %llx", &cap_inh) == 1 ||
			   sscanf(line, "CapPrm: %llx", &cap_prm) == 1 ||
			   sscanf(line, "CapEff: %llx", &cap_eff) == 1) {
			continue;
		} else if (strncmp(line, "Groups:", 7) == 0) {
			char *p = line + 7, *end;
			while (ngroups < MAX_GROUPS) {
				unsigned long g = strtoul(p, &end, 10);
				if (end == p)
					break;
				groups[ngroups++] = g;
				p = end;
			}
		}
	}
	fclose(st);
	if (!have_uid || !have_gid)
		return FAIL;

	int root = open_proc(pid, "root", O_PATH | O_DIRECTORY);
	int cwd = open_proc(pid, "cwd", O_PATH | O_DIRECTORY);
	int userns = open_proc(pid, "ns/user", O_RDONLY);
	int mntns = open_proc(pid, "ns/mnt", O_RDONLY);
	if (root < 0 || cwd < 0 || userns < 0 || mntns < 0)
		return FAIL;

	/* Ids inside the caller's user namespace (before joining it). */
	long in_uid = map_id(pid, "uid_map", uid), in_gid = map_id(pid, "gid_map", gid);
	gid_t in_groups[MAX_GROUPS];
	int n_in = 0;
	for (int i = 0; i < ngroups; i++) {
		long g = map_id(pid, "gid_map", groups[i]);
		if (g >= 0)
			in_groups[n_in++] = (gid_t)g;
	}
	if (in_uid < 0 || in_gid < 0)
		return FAIL;

	int same_user = same_ns(pid, "user"), same_mnt = same_ns(pid, "mnt");
	if (same_user < 0 || same_mnt < 0)
		return FAIL;
	/* Everything about the caller was read by PID above. Its pidfd still alive
	 * now means PID was the caller all along (a PID is not reused before its
	 * task is gone). */
	if (syscall(SYS_pidfd_send_signal, pidfd, 0, NULL, 0) != 0)
		return FAIL;
	close(pidfd);

	/* Into the caller's slice's cgroups (argv[4...], one per hierarchy, given by the
	 * agent), so that what this helper does from now on is charged to the slice
	 * (F36). Best effort: a sliver without groups (a test harness) has none. */
	for (int i = 4; i < argc; i++) {
		char procs[4096];
		if (snprintf(procs, sizeof procs, "%s/cgroup.procs", argv[i]) >= (int)sizeof procs)
			return FAIL;
		int cg = open(procs, O_WRONLY | O_CLOEXEC);
		if (cg < 0 || write(cg, "0", 1) != 1)
			return FAIL;
		close(cg);
	}

	/* User namespace first (it grants the rights to join its mount namespace). */
	if (!same_user && setns(userns, CLONE_NEWUSER))
		return FAIL;
	if (!same_mnt && setns(mntns, CLONE_NEWNS))
		return FAIL;
	if (fchdir(root) || chroot(".") || fchdir(cwd))
		return FAIL;
	if (setgroups((size_t)n_in, in_groups) && errno != EPERM)
		return FAIL;
	if (setresgid((gid_t)in_gid, (gid_t)in_gid, (gid_t)in_gid) ||
	    setresuid((uid_t)in_uid, (uid_t)in_uid, (uid_t)in_uid))
		return FAIL;
	umask((mode_t)umask_v);
	/* Exactly the caller's capabilities (in its user namespace). setresuid above
	 * clears none: we were not that namespace's root before, so the kernel's
	 * "root becomes non-root" rule does not apply. */
	struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };
	struct __user_cap_data_struct caps[2] = {
		{ (__u32)cap_eff, (__u32)cap_prm, (__u32)cap_inh },
		{ (__u32)(cap_eff >> 32), (__u32)(cap_prm >> 32), (__u32)(cap_inh >> 32) },
	};
	if (syscall(SYS_capset, &hdr, caps))
		return FAIL;

	if (bind(sock, (struct sockaddr *)addr, (socklen_t)len) < 0)
		return errno > 0 && errno < FAIL ? errno : FAIL;
	return 0;
}
