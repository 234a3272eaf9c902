/* Small fd helpers shared by the agent's login shells (vsh.c, forward_api_calls.c). */
#ifndef AGENT_FDIO_H
#define AGENT_FDIO_H

#include <errno.h>
#include <poll.h>
#include <unistd.h>

/* Write all `n` bytes of `p` to `fd` (retrying after signals, waiting when a
 * non-blocking fd is full); 0, or -1 with errno. */
static inline int write_all(int fd, const char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = write(fd, p, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN) {
				struct pollfd pf = {.fd = fd, .events = POLLOUT};
				poll(&pf, 1, -1);
				continue;
			}
			return -1;
		}
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

#endif
