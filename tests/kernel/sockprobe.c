/* Socket probe run inside slivers by tests/kernel/test_sockcap.py (static, no libc
 * needed in the sliver's busybox root). Each argument is one step; each step prints
 * one line: "ok" or "E<errno>" (or a count for "drain").
 *
 *   u4 u6 t4 t6   socket(AF_INET/AF_INET6, SOCK_DGRAM/SOCK_STREAM); kept open
 *   unix          socket(AF_UNIX, SOCK_STREAM); kept open
 *   send4         UDP v4 socket + sendto 127.0.0.1:9 (autobind to an ephemeral port)
 *   conn6         UDP v6 socket + connect [::1]:9 (autobind)
 *   close         close the socket opened last
 *   drain         socket(AF_INET, SOCK_DGRAM) + bind(port 0) until one fails (at most
 *                 100000): prints "N E<errno>" (N sockets held), keeps them open
 *   wait          print "waiting", then block until stdin is closed
 */
#include <errno.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int fds[200000];
static int nfds;

static void report(int fd)
{
	if (fd < 0) {
		printf("E%d\n", errno);
	} else {
		fds[nfds++] = fd;
		printf("ok\n");
	}
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "u4")) {
			report(socket(AF_INET, SOCK_DGRAM, 0));
		} else if (!strcmp(a, "u6")) {
			report(socket(AF_INET6, SOCK_DGRAM, 0));
		} else if (!strcmp(a, "t4")) {
			report(socket(AF_INET, SOCK_STREAM, 0));
		} else if (!strcmp(a, "t6")) {
			report(socket(AF_INET6, SOCK_STREAM, 0));
		} else if (!strcmp(a, "unix")) {
			report(socket(AF_UNIX, SOCK_STREAM, 0));
		} else if (!strcmp(a, "send4")) {
			int fd = socket(AF_INET, SOCK_DGRAM, 0);
			if (fd >= 0) {
				struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(9) };
				sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
				if (sendto(fd, "x", 1, 0, (struct sockaddr *)&sa, sizeof sa) < 0) {
					printf("sendto E%d\n", errno);
					continue;
				}
			}
			report(fd);
		} else if (!strcmp(a, "conn6")) {
			int fd = socket(AF_INET6, SOCK_DGRAM, 0);
			if (fd >= 0) {
				struct sockaddr_in6 sa = { .sin6_family = AF_INET6, .sin6_port = htons(9) };
				sa.sin6_addr = in6addr_loopback;
				if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
					printf("connect E%d\n", errno);
					continue;
				}
			}
			report(fd);
		} else if (!strcmp(a, "close")) {
			if (nfds > 0)
				close(fds[--nfds]);
			printf("ok\n");
		} else if (!strcmp(a, "drain")) {
			int n = 0, e = 0;
			while (nfds < 100000) {
				int fd = socket(AF_INET, SOCK_DGRAM, 0);
				if (fd < 0) {
					e = errno;
					break;
				}
				struct sockaddr_in sa = { .sin_family = AF_INET };
				if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
					e = errno;
					close(fd);
					break;
				}
				fds[nfds++] = fd;
				n++;
			}
			printf("%d E%d\n", n, e);
		} else if (!strcmp(a, "wait")) {
			char c;
			printf("waiting\n");
			while (read(0, &c, 1) > 0)
				;
		} else {
			printf("unknown step %s\n", a);
			return 2;
		}
	}
	return 0;
}
