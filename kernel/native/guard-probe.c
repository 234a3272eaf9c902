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
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>

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

int main(int argc, char **argv)
{
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
