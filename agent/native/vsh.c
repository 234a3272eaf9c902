/*
 * vsh: the login shell of a slice's host account. `ssh SLICE@node` runs it; it asks
 * the node agent to start the session inside the slice's sliver, and needs no setuid:
 *
 *   1. connect to the agent's socket ($HOME/.agent.sock, a link the agent made);
 *   2. send "ENTER1 <tty> <rows> <cols> <n>\n" and n NUL-terminated strings (TERM,
 *      then the command for `sh -c`, if any). No fd goes along: none of ours ever
 *      enters the sliver (a terminal could be read from inside later [F10], a file
 *      written by a process the session left behind [F37]);
 *   3. the agent knows the slice from SO_PEERCRED (this account's uid), never from
 *      anything sent here;
 *   4. with a terminal, the agent answers "PTY\n" with the master side of a pty made
 *      inside the sliver; vsh relays between its own terminal (raw mode) and it, and
 *      passes window size changes on. Without one, it answers "PIPES\n" with the
 *      host ends of the session's stdin, stdout and stderr pipes (SCM_RIGHTS); vsh
 *      relays its own stdio to them, its stdin's end closing the session's;
 *   5. the agent sends "EXIT <code>\n" when the session's process ends; vsh copies
 *      what the pipes still hold (bounded), closes them (a process left behind that
 *      writes gets EPIPE) and exits with that code. Any failure prints one line
 *      naming it and exits 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
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

/* Read one reply line from the agent, keeping up to `want` fds that come along in
 * `fds` (more are closed); *got says how many were kept. */
static int read_line(int sock, char *buf, size_t size, int *fds, int want, int *got)
{
	size_t len = 0;
	if (got)
		*got = 0;
	while (len + 1 < size) {
		char c;
		struct iovec iov = {.iov_base = &c, .iov_len = 1};
		char ctl[CMSG_SPACE(8 * sizeof(int))];
		struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1,
				    .msg_control = ctl, .msg_controllen = sizeof ctl};
		ssize_t r = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
			if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
				continue;
			size_t n = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
			for (size_t i = 0; i < n; i++) {
				int fd;
				memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof fd);
				if (got && *got < want)
					fds[(*got)++] = fd;
				else
					close(fd);
			}
		}
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
	if (read_line(sock, line, sizeof line, NULL, 0, NULL) < 0)
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

/* Copy what `*src` has now to `dest`: the bytes copied, 0 if none. `*src` is closed
 * (-1) at its end, or when `dest` fails (the session then gets EPIPE, as it would
 * writing `dest` itself). */
static size_t pump(int *src, int dest, char *buf, size_t size)
{
	ssize_t r = read(*src, buf, size);
	if (r < 0 && (errno == EINTR || errno == EAGAIN))
		return 0;
	if (r <= 0 || write_all(dest, buf, (size_t)r) < 0) {
		close(*src);
		*src = -1;
		return 0;
	}
	return (size_t)r;
}

/* At most this much is copied from each output pipe once the session has ended: a
 * process left behind that writes without pause does not hold vsh. */
#define DRAIN_MAX (1 << 20)

/* Without a terminal: relay our stdin to the session's stdin pipe (`fds[0]`) and its
 * stdout and stderr pipes (`fds[1]`, `fds[2]`) to ours until the agent speaks
 * ("EXIT"); then copy what the pipes hold and close them. No write here waits on the
 * session: its stdin pipe is non-blocking and fed from a buffer, so a session that
 * does not read its stdin still has its output relayed. */
static void relay_pipes(int sock, int fds[3])
{
	char buf[16384], pend[16384];
	size_t plen = 0, poff = 0;
	int in_open = 1, in = fds[0], out[2] = {fds[1], fds[2]};
	for (int i = 0; i < 3; i++)
		fcntl(fds[i], F_SETFL, fcntl(fds[i], F_GETFL) | O_NONBLOCK);
	for (;;) {
		struct pollfd p[5] = {{.fd = in_open && !plen ? 0 : -1, .events = POLLIN},
				      {.fd = plen ? in : -1, .events = POLLOUT},
				      {.fd = out[0], .events = POLLIN},
				      {.fd = out[1], .events = POLLIN},
				      {.fd = sock, .events = POLLIN}};
		if (poll(p, 5, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		if (p[0].revents) {
			ssize_t r = read(0, pend, sizeof pend);
			if (r > 0) {
				plen = (size_t)r;
				poff = 0;
			} else if (r == 0 || (errno != EINTR && errno != EAGAIN)) {
				in_open = 0;    /* our stdin ended: so does the session's */
				close(in);
				in = -1;
			}
		}
		if (p[1].revents) {
			ssize_t w = write(in, pend + poff, plen - poff);
			if (w > 0 && (poff += (size_t)w) == plen)
				plen = poff = 0;
			if (w < 0 && errno != EINTR && errno != EAGAIN) {
				in_open = 0;    /* the session closed its stdin */
				close(in);
				in = -1;
				plen = poff = 0;
			}
		}
		for (int i = 0; i < 2; i++)
			if (p[2 + i].revents)
				pump(&out[i], 1 + i, buf, sizeof buf);
		if (p[4].revents)
			break;  /* the agent speaks only at the end */
	}
	for (int i = 0; i < 2; i++) {
		size_t copied = 0, n;
		while (out[i] >= 0 && copied < DRAIN_MAX &&
		       (n = pump(&out[i], 1 + i, buf, sizeof buf)) > 0)
			copied += n;
	}
	for (int i = 0; i < 2; i++)
		if (out[i] >= 0)
			close(out[i]);
	if (in >= 0)
		close(in);
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

	if (write_all(sock, msg, total) < 0)
		die("sending the request");
	free(msg);
	/* A closed stdout or ssh client is an error of one write, not a signal. */
	signal(SIGPIPE, SIG_IGN);

	char line[128];
	int fds[3], got = 0;
	if (read_line(sock, line, sizeof line, fds, 3, &got) < 0)
		die("the agent closed the session");
	if (strcmp(line, tty ? "PTY" : "PIPES") != 0 || got != (tty ? 1 : 3)) {
		errno = 0;
		fprintf(stderr, "vsh: %s\n", line);
		return 1;
	}
	if (!tty) {
		relay_pipes(sock, fds);
		return finish(sock);
	}
	int master = fds[0];
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
