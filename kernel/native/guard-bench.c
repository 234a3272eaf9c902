/* guard-bench: the client side of bench/guard.py. Prints "NAME NS_PER_OP".
 *
 *   guard-bench bind N HOST PORT   N times: socket, bind HOST:PORT (TCP), close
 *   guard-bench getpid N           N getpid(2) (unguarded: allowed by the filter)
 *   guard-bench read N [SIZE]      N read(2) of SIZE bytes (default 1, at most 1 MiB)
 *                                  from /dev/zero
 *
 * A bind that fails stops the run (exit 1) so that a figure is never that of
 * refused binds.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc < 3)
		return 2;
	long n = atol(argv[2]);
	if (n <= 0)
		return 2;
	double t0, t1;
	if (strcmp(argv[1], "bind") == 0 && argc == 5) {
		struct sockaddr_in sa;
		memset(&sa, 0, sizeof sa);
		sa.sin_family = AF_INET;
		sa.sin_port = htons((unsigned short)atoi(argv[4]));
		if (inet_pton(AF_INET, argv[3], &sa.sin_addr) != 1)
			return 2;
		t0 = now_ns();
		for (long i = 0; i < n; i++) {
			int fd = socket(AF_INET, SOCK_STREAM, 0);
			int one = 1;
			setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
			if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
				fprintf(stderr, "guard-bench: bind %ld: %s\n", i, strerror(errno));
				return 1;
			}
			close(fd);
		}
		t1 = now_ns();
	} else if (strcmp(argv[1], "getpid") == 0) {
		t0 = now_ns();
		for (long i = 0; i < n; i++)
			syscall(SYS_getpid);
		t1 = now_ns();
	} else if (strcmp(argv[1], "read") == 0) {
		long size = argc > 3 ? atol(argv[3]) : 1;
		if (size <= 0 || size > (1L << 20))
			return 2;
		char *buf = malloc((size_t)size);
		int fd = open("/dev/zero", O_RDONLY);
		if (fd < 0 || !buf)
			return 1;
		memset(buf, 1, (size_t)size); /* fault the pages in before timing */
		t0 = now_ns();
		for (long i = 0; i < n; i++)
			if (read(fd, buf, (size_t)size) != size)
				return 1;
		t1 = now_ns();
		free(buf);
	} else {
		return 2;
	}
	printf("%s %.1f\n", argv[1], (t1 - t0) / (double)n);
	return 0;
}
