/* guard-probe: make the syscalls the guard filter decides, print the results.
 * Static, so it also runs inside a busybox sliver.
 *
 *   guard-probe            "NAME RESULT" lines, RESULT the raw return (-errno):
 *                            i386_getpid   getpid (20) by the IA-32 entry, int $0x80
 *                            x32_getpid    getpid (39) with the x32 bit on the 64-bit entry
 *                            native_getpid getpid by the normal 64-bit entry
 *   guard-probe bind ADDR PORT [udp]
 *                          "bind ERRNO PORT": bind an IPv4/IPv6 socket (0 = success,
 *                          PORT = the port bound)
 *   guard-probe raw        "packet ERRNO" and "raw ERRNO" for socket(AF_PACKET) and
 *                          socket(AF_INET, SOCK_RAW)
 *   guard-probe unix PATH  "unix ERRNO": bind a Unix socket ('@' first: abstract)
 *   guard-probe socket FAMILY TYPE PROTO
 *                          "socket ERRNO": socket(FAMILY, TYPE, PROTO), numbers
 *   guard-probe statfs PATH / fstatfs PATH
 *                          "statfs ERRNO TYPE BSIZE FRSIZE BLOCKS BFREE BAVAIL FILES":
 *                          statfs(PATH), or fstatfs of PATH opened O_RDONLY
 *   guard-probe statfs-bad PATH
 *                          "NAME ERRNO" lines: statfs(PATH) into a NULL, a read-only
 *                          and a text-segment buffer; of a path with no NUL within
 *                          PATH_MAX, and of one running into an unmapped page
 *   guard-probe sflood SECONDS PROCS PATH
 *                          "sflood TOTAL": PROCS processes statfs(PATH) in a loop
 *   guard-probe slat COUNT PATH
 *                          "slat NS_PER_CALL": COUNT statfs(PATH) back to back
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/statfs.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long native_syscall0(long nr)
{
	long ret;
	__asm__ volatile("syscall" : "=a"(ret) : "a"(nr) : "rcx", "r11", "memory");
	return ret;
}

static long i386_syscall0(long nr)
{
	long ret;
	__asm__ volatile("int $0x80" : "=a"(ret) : "a"(nr) : "memory");
	return ret;
}

static int probe_bind(const char *addr, int port, int udp)
{
	struct sockaddr_storage ss;
	socklen_t len;
	memset(&ss, 0, sizeof ss);
	struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
	struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
	if (inet_pton(AF_INET, addr, &s4->sin_addr) == 1) {
		s4->sin_family = AF_INET;
		s4->sin_port = htons((unsigned short)port);
		len = sizeof *s4;
	} else if (inet_pton(AF_INET6, addr, &s6->sin6_addr) == 1) {
		s6->sin6_family = AF_INET6;
		s6->sin6_port = htons((unsigned short)port);
		len = sizeof *s6;
	} else {
		fprintf(stderr, "guard-probe: bad address %s\n", addr);
		return 2;
	}
	int fd = socket(ss.ss_family, udp ? SOCK_DGRAM : SOCK_STREAM, 0);
	if (fd < 0) {
		printf("socket %d\n", errno);
		return 1;
	}
	int err = bind(fd, (struct sockaddr *)&ss, len) < 0 ? errno : 0;
	int bound = 0;
	if (!err) {
		len = sizeof ss;
		getsockname(fd, (struct sockaddr *)&ss, &len);
		bound = ntohs(ss.ss_family == AF_INET ? s4->sin_port : s6->sin6_port);
	}
	printf("bind %d %d\n", err, bound);
	return 0;
}

static int probe_unix(const char *path)
{
	struct sockaddr_un sun;
	memset(&sun, 0, sizeof sun);
	sun.sun_family = AF_UNIX;
	size_t n = strlen(path);
	if (n >= sizeof sun.sun_path)
		return 2;
	memcpy(sun.sun_path, path, n);
	if (path[0] == '@')
		sun.sun_path[0] = '\0';
	int fd = socket(AF_UNIX, SOCK_STREAM, 0);
	int err = bind(fd, (struct sockaddr *)&sun,
		       (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + (path[0] != '@'))) < 0
			  ? errno : 0;
	printf("unix %d\n", err);
	return 0;
}

static struct sockaddr_in sin4(const char *addr, int port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((unsigned short)port) };
	inet_pton(AF_INET, addr, &a.sin_addr);
	return a;
}

/* hold N ADDR PORT: N fds (dups of stdin) over as many processes as RLIMIT_NOFILE
 * needs, then, in the last of them (highest pid), a UDP socket bound to ADDR:PORT
 * (its last fd: a holder search meets it last); prints "hold ERR" and waits. */
static int probe_hold(long n, const char *addr, int port)
{
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
	long per = getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur > 200 &&
			   rl.rlim_cur != RLIM_INFINITY ? (long)rl.rlim_cur - 100 : n;
	while (n > per) {   /* the other holders: fds only */
		pid_t child = fork();
		if (child == 0) {
			for (long i = 0; i < per; i++)
				if (dup(0) < 0)
					_exit(1);
			pause();
			_exit(0);
		}
		n -= per;
	}
	if (fork() != 0) {   /* the socket's holder is the last process made */
		pause();
		return 0;
	}
	for (long i = 0; i < n; i++)
		if (dup(0) < 0) {
			printf("hold %d\n", errno);
			return 0;
		}
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	struct sockaddr_in a = sin4(addr, port);
	printf("hold %d\n", bind(fd, (struct sockaddr *)&a, sizeof a) < 0 ? errno : 0);
	fflush(stdout);
	pause();
	return 0;
}

static double now_us(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

/* lat COUNT ADDR PORT: COUNT times socket+bind+close, a pause of 2 ms between;
 * prints "lat P50_US P90_US MAX_US ERRNO_OF_LAST". */
static int probe_lat(int count, const char *addr, int port)
{
	double *t = calloc((size_t)count, sizeof *t);
	int err = 0;
	struct sockaddr_in a = sin4(addr, port);
	for (int i = 0; i < count; i++) {
		int fd = socket(AF_INET, SOCK_STREAM, 0);
		double t0 = now_us();
		err = bind(fd, (struct sockaddr *)&a, sizeof a) < 0 ? errno : 0;
		t[i] = now_us() - t0;
		close(fd);
		usleep(2000);
	}
	qsort(t, (size_t)count, sizeof *t, cmp_double);
	printf("lat %.0f %.0f %.0f %d\n", t[count / 2], t[count * 9 / 10], t[count - 1], err);
	return 0;
}

/* flood SECONDS PROCS ADDR PORT: PROCS processes bind ADDR:PORT (refused) in a loop;
 * prints "flood TOTAL". A path starting with '/' instead of ADDR: Unix-path binds. */
/* A flood's child reports how many calls it made, and exits. */
static void report_count(int fd, long n)
{
	if (write(fd, &n, sizeof n) != sizeof n)
		_exit(1);
	_exit(0);
}

/* The parent adds up its children's counts and reaps them. */
static long gather_counts(int pipefd[2])
{
	close(pipefd[1]);
	long total = 0, n;
	while (read(pipefd[0], &n, sizeof n) == sizeof n)
		total += n;
	while (wait(NULL) > 0)
		;
	return total;
}

static int probe_flood(double seconds, int procs, const char *addr, int port)
{
	int pipefd[2];
	if (pipe(pipefd) < 0)
		return 1;
	for (int p = 0; p < procs; p++) {
		if (fork() == 0) {
			long n = 0;
			double end = now_us() + seconds * 1e6;
			struct sockaddr_in a = sin4(addr, port);
			struct sockaddr_un u = { .sun_family = AF_UNIX };
			snprintf(u.sun_path, sizeof u.sun_path, "%s.%d", addr, p);
			while (now_us() < end) {
				if (addr[0] == '/') {
					unlink(u.sun_path);
					int fd = socket(AF_UNIX, SOCK_STREAM, 0);
					bind(fd, (struct sockaddr *)&u, sizeof u);
					close(fd);
				} else {
					int fd = socket(AF_INET, SOCK_STREAM, 0);
					bind(fd, (struct sockaddr *)&a, sizeof a);
					close(fd);
				}
				n++;
			}
			report_count(pipefd[1], n);
		}
	}
	printf("flood %ld\n", gather_counts(pipefd));
	return 0;
}

static void print_statfs(const char *what, int ret, const struct statfs *f)
{
	if (ret < 0) {
		printf("%s %d\n", what, errno);
		return;
	}
	printf("%s 0 %lx %ld %ld %llu %llu %llu %llu\n", what, (long)f->f_type, (long)f->f_bsize,
	       (long)f->f_frsize, (unsigned long long)f->f_blocks,
	       (unsigned long long)f->f_bfree, (unsigned long long)f->f_bavail,
	       (unsigned long long)f->f_files);
}

static int probe_statfs(const char *path, int by_fd)
{
	struct statfs f;
	int ret;
	if (by_fd) {
		int fd = open(path, O_RDONLY);
		ret = fd < 0 ? fd : fstatfs(fd, &f);
	} else {
		ret = statfs(path, &f);
	}
	print_statfs(by_fd ? "fstatfs" : "statfs", ret, &f);
	return 0;
}

static int probe_statfs_bad(const char *path)
{
	long page = sysconf(_SC_PAGESIZE);
	struct statfs *volatile nul = NULL;   /* volatile: glibc declares buf nonnull */
	printf("null %d\n", statfs(path, nul) < 0 ? errno : 0);
	void *ro = mmap(NULL, (size_t)page, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	printf("readonly %d\n", statfs(path, ro) < 0 ? errno : 0);
	printf("text %d\n", statfs(path, (struct statfs *)(void *)probe_statfs_bad) < 0 ? errno : 0);
	char *two = mmap(NULL, 2 * (size_t)page, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	struct statfs f;
	memset(two, 'a', 2 * (size_t)page);
	two[0] = '/';
	printf("toolong %d\n", statfs(two, &f) < 0 ? errno : 0);
	munmap(two + page, (size_t)page);
	printf("unterminated %d\n", statfs(two + page / 2, &f) < 0 ? errno : 0);
	return 0;
}

static int probe_sflood(double seconds, int procs, const char *path)
{
	int pipefd[2];
	if (pipe(pipefd) < 0)
		return 1;
	for (int p = 0; p < procs; p++) {
		if (fork() == 0) {
			long n = 0;
			struct statfs f;
			double end = now_us() + seconds * 1e6;
			while (now_us() < end) {
				statfs(path, &f);
				n++;
			}
			report_count(pipefd[1], n);
		}
	}
	printf("sflood %ld\n", gather_counts(pipefd));
	return 0;
}

static int probe_slat(long count, const char *path)
{
	struct statfs f;
	double t0 = now_us();
	for (long i = 0; i < count; i++)
		statfs(path, &f);
	printf("slat %.0f\n", (now_us() - t0) * 1e3 / (double)count);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 3 && (strcmp(argv[1], "statfs") == 0 || strcmp(argv[1], "fstatfs") == 0))
		return probe_statfs(argv[2], argv[1][0] == 'f');
	if (argc == 3 && strcmp(argv[1], "statfs-bad") == 0)
		return probe_statfs_bad(argv[2]);
	if (argc == 5 && strcmp(argv[1], "sflood") == 0)
		return probe_sflood(atof(argv[2]), atoi(argv[3]), argv[4]);
	if (argc == 4 && strcmp(argv[1], "slat") == 0)
		return probe_slat(atol(argv[2]), argv[3]);
	if (argc == 5 && strcmp(argv[1], "hold") == 0)
		return probe_hold(atol(argv[2]), argv[3], atoi(argv[4]));
	if (argc == 5 && strcmp(argv[1], "lat") == 0)
		return probe_lat(atoi(argv[2]), argv[3], atoi(argv[4]));
	if (argc == 6 && strcmp(argv[1], "flood") == 0)
		return probe_flood(atof(argv[2]), atoi(argv[3]), argv[4], atoi(argv[5]));
	if (argc >= 4 && strcmp(argv[1], "bind") == 0)
		return probe_bind(argv[2], atoi(argv[3]), argc > 4 && strcmp(argv[4], "udp") == 0);
	if (argc == 3 && strcmp(argv[1], "unix") == 0)
		return probe_unix(argv[2]);
	if (argc == 5 && strcmp(argv[1], "socket") == 0) {
		int fd = socket(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]));
		printf("socket %d\n", fd < 0 ? errno : 0);
		return 0;
	}
	if (argc == 2 && strcmp(argv[1], "raw") == 0) {
		int fd = socket(AF_PACKET, SOCK_RAW, 0);
		printf("packet %d\n", fd < 0 ? errno : 0);
		fd = socket(AF_INET, SOCK_RAW, IPPROTO_ICMP);
		printf("raw %d\n", fd < 0 ? errno : 0);
		return 0;
	}
	printf("i386_getpid %ld\n", i386_syscall0(20));
	printf("x32_getpid %ld\n", native_syscall0(0x40000000L | 39));
	printf("native_getpid %ld\n", native_syscall0(39));
	return 0;
}
