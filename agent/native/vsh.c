/*
 * vsh: the login shell of a slice's host account. `ssh SLICE@node` runs it; it asks
 * the node agent to start the session inside the slice's sliver, and needs no setuid:
 *
 *   1. connect to the agent's socket ($HOME/.agent.sock, a link the agent made);
 *   2. send "ENTER1 <tty> <rows> <cols> <n>\n" and n NUL-terminated strings (TERM,
 *      then the command for `sh -c`, if any). Without a terminal, fds 0, 1 and 2 go
 *      along with it (SCM_RIGHTS) and the sliver's process uses them directly;
 *   3. the agent knows the slice from SO_PEERCRED (this account's uid), never from
 *      anything sent here;
 *   4. with a terminal, the agent answers "PTY\n" with the master side of a pty made
 *      inside the sliver; vsh relays between its own terminal (raw mode) and it, and
 *      passes window size changes on;
 *   5. the agent sends "EXIT <code>\n" when the session's process ends; vsh exits
 *      with that code. Any failure prints one line naming it and exits 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <termios.h>
#include <unistd.h>

#include "fdio.h"

static struct termios saved;
static int have_saved;
static volatile sig_atomic_t winch;

static void restore(void)
{
	if (have_saved)
		tcsetattr(0, TCSAFLUSH, &saved);
}

static void die(const char *what)
{
	restore();
	fprintf(stderr, "vsh: %s: %s\n", what, errno ? strerror(errno) : "failed");
	exit(1);
}

static void on_winch(int sig)
{
	(void)sig;
	winch = 1;
}

/* Read one reply line from the agent, with an fd if one comes along. */
static int read_line(int sock, char *buf, size_t size, int *fd)
{
	size_t len = 0;
	while (len + 1 < size) {
		char c;
		struct iovec iov = {.iov_base = &c, .iov_len = 1};
		char ctl[CMSG_SPACE(sizeof(int))];
		struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1,
				    .msg_control = ctl, .msg_controllen = sizeof ctl};
		ssize_t r = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm))
			if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS && fd)
				memcpy(fd, CMSG_DATA(cm), sizeof(int));
		if (c == '\n')
			break;
		buf[len++] = c;
	}
	buf[len] = 0;
	return 0;
}

static int finish(int sock)
{
	char line[128];
	if (read_line(sock, line, sizeof line, NULL) < 0)
		die("the agent closed the session");
	restore();
	if (strncmp(line, "EXIT ", 5) == 0)
		return atoi(line + 5) & 0xff;
	errno = 0;
	fprintf(stderr, "vsh: %s\n", line);
	return 1;
}

static void relay(int sock, int master)
{
	char buf[16384];
	int in_open = 1;
	struct winsize ws;
	for (;;) {
		if (winch) {
			winch = 0;
			if (ioctl(0, TIOCGWINSZ, &ws) == 0)
				ioctl(master, TIOCSWINSZ, &ws);
		}
		struct pollfd p[3] = {{.fd = master, .events = POLLIN},
				      {.fd = in_open ? 0 : -1, .events = POLLIN},
				      {.fd = sock, .events = POLLIN}};
		if (poll(p, 3, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		if (p[0].revents) {
			ssize_t r = read(master, buf, sizeof buf);
			if (r <= 0)
				return;  /* EIO: the session's last process closed the pty */
			if (write_all(1, buf, (size_t)r) < 0)
				return;
		}
		if (p[1].revents) {
			ssize_t r = read(0, buf, sizeof buf);
			if (r <= 0)
				in_open = 0;
			else if (write_all(master, buf, (size_t)r) < 0)
				return;
		}
		if (p[2].revents)
			return;  /* the agent speaks only at the end */
	}
}

int main(int argc, char **argv)
{
	const char *home = getenv("HOME");
	const char *term = getenv("TERM");
	const char *cmd = NULL;
	char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	struct winsize ws = {0};
	int tty = isatty(0) && isatty(1);

	/* sshd runs "vsh -c CMD" for a command, "-vsh" (argv[0]) for a login. */
	if (argc >= 3 && strcmp(argv[1], "-c") == 0)
		cmd = argv[2];
	if (!home || snprintf(path, sizeof path, "%s/.agent.sock", home) >= (int)sizeof path) {
		errno = ENAMETOOLONG;
		die("$HOME/.agent.sock");
	}
	memcpy(sa.sun_path, path, strlen(path) + 1);
	int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (sock < 0)
		die("socket");
	if (connect(sock, (struct sockaddr *)&sa, sizeof sa) < 0)
		die("connecting to the node agent");
	if (tty)
		ioctl(0, TIOCGWINSZ, &ws);

	char head[128];
	int n = snprintf(head, sizeof head, "ENTER1 %d %u %u %d\n", tty, ws.ws_row, ws.ws_col,
			 cmd ? 2 : 1);
	size_t tlen = strlen(term ? term : "") + 1, clen = cmd ? strlen(cmd) + 1 : 0;
	size_t total = (size_t)n + tlen + clen;
	char *msg = malloc(total);
	if (!msg)
		die("malloc");
	memcpy(msg, head, (size_t)n);
	memcpy(msg + n, term ? term : "", tlen);
	if (cmd)
		memcpy(msg + n + tlen, cmd, clen);

	struct iovec iov = {.iov_base = msg, .iov_len = total};
	int fds[3] = {0, 1, 2};
	char ctl[CMSG_SPACE(sizeof fds)];
	struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
	if (!tty) {
		memset(ctl, 0, sizeof ctl);
		mh.msg_control = ctl;
		mh.msg_controllen = sizeof ctl;
		struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(sizeof fds);
		memcpy(CMSG_DATA(cm), fds, sizeof fds);
	}
	if (sendmsg(sock, &mh, 0) != (ssize_t)total)
		die("sending the request");
	free(msg);
	if (!tty)
		return finish(sock);

	char line[128];
	int master = -1;
	if (read_line(sock, line, sizeof line, &master) < 0)
		die("the agent closed the session");
	if (strcmp(line, "PTY") != 0 || master < 0) {
		errno = 0;
		fprintf(stderr, "vsh: %s\n", line);
		return 1;
	}
	struct sigaction sa_w = {.sa_handler = on_winch};
	sigaction(SIGWINCH, &sa_w, NULL);
	if (tcgetattr(0, &saved) == 0) {
		struct termios raw = saved;
		have_saved = 1;
		cfmakeraw(&raw);
		tcsetattr(0, TCSAFLUSH, &raw);
	}
	relay(sock, master);
	close(master);
	return finish(sock);
}
