/*
 * forward_api_calls: the login shell of a controller slice's host account
 * (instantiation nm-controller; nodemanager spec 4.5). A controller runs
 * `ssh CONTROLLER@node < request.xml`; this program
 *
 *   1. reads its standard input to the end, up to 1 MiB: one XML-RPC methodCall;
 *   2. sends it as one HTTP/1.0 POST to the node agent's socket ($HOME/.agent.sock, a
 *      link the agent made), which knows the caller from SO_PEERCRED (this account's
 *      uid), never from anything sent here;
 *   3. writes the body of the answer (everything after the headers) to its standard
 *      output and exits 0.
 *
 * Any failure (too much input, no agent, a timeout of 120 s) is written as an XML-RPC
 * fault with code 1 naming it, and the exit status is 1. Arguments (sshd passes
 * `-c COMMAND`) are ignored: the request is the input.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "fdio.h"

#define MAX_REQUEST (1 << 20)
#define MAX_RESPONSE (16 << 20)
#define TIMEOUT 120

static void fault(const char *what)
{
	/* `what` is one of this file's constant texts, with no character XML escapes. */
	printf("<?xml version='1.0'?>\n<methodResponse>\n<fault>\n<value><struct>\n"
	       "<member>\n<name>faultCode</name>\n<value><int>1</int></value>\n</member>\n"
	       "<member>\n<name>faultString</name>\n<value><string>forward_api_calls: %s"
	       "</string></value>\n</member>\n</struct></value>\n</fault>\n</methodResponse>\n",
	       what);
	fflush(stdout);
	exit(1);
}

static void on_alarm(int sig)
{
	(void)sig;
	static const char msg[] = "<?xml version='1.0'?>\n<methodResponse>\n<fault>\n"
		"<value><struct>\n<member>\n<name>faultCode</name>\n<value><int>1</int></value>\n"
		"</member>\n<member>\n<name>faultString</name>\n<value><string>"
		"forward_api_calls: no answer within 120 s</string></value>\n</member>\n"
		"</struct></value>\n</fault>\n</methodResponse>\n";
	ssize_t ignored = write(1, msg, sizeof msg - 1);
	(void)ignored;
	_exit(1);
}

/* Read `fd` to its end into a new buffer of at most `max` bytes; -1 if longer. */
static long read_all(int fd, char **out, size_t max)
{
	size_t cap = 65536, len = 0;
	char *buf = malloc(cap + 1);
	if (!buf)
		fault("out of memory");
	for (;;) {
		if (len == cap) {
			if (cap >= max + 1)
				break;
			cap = cap * 2 > max + 1 ? max + 1 : cap * 2;
			char *bigger = realloc(buf, cap + 1);
			if (!bigger)
				fault("out of memory");
			buf = bigger;
		}
		ssize_t r = read(fd, buf + len, cap - len);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			fault("reading failed");
		}
		if (r == 0)
			break;
		len += (size_t)r;
	}
	buf[len] = 0;
	*out = buf;
	return len > max ? -1 : (long)len;
}

int main(void)
{
	signal(SIGALRM, on_alarm);
	signal(SIGPIPE, SIG_IGN);
	alarm(TIMEOUT);

	char *request;
	long n = read_all(0, &request, MAX_REQUEST);
	if (n < 0)
		fault("the request is larger than 1 MiB");

	const char *home = getenv("HOME");
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	if (!home || snprintf(sa.sun_path, sizeof sa.sun_path, "%s/.agent.sock", home) >=
			     (int)sizeof sa.sun_path)
		fault("no agent socket (HOME is not set or too long)");
	int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s < 0 || connect(s, (struct sockaddr *)&sa, sizeof sa) < 0)
		fault("cannot reach the node agent");

	char head[128];
	int hl = snprintf(head, sizeof head, "POST / HTTP/1.0\r\nContent-Type: text/xml\r\n"
			  "Content-Length: %ld\r\n\r\n", n);
	if (write_all(s, head, (size_t)hl) < 0 || write_all(s, request, (size_t)n) < 0)
		fault("sending the request to the node agent failed");
	shutdown(s, SHUT_WR);

	char *response;
	long m = read_all(s, &response, MAX_RESPONSE);
	if (m < 0)
		fault("the answer is larger than 16 MiB");
	char *body = strstr(response, "\r\n\r\n");
	if (!body || strncmp(response, "HTTP/1.", 7) != 0)
		fault("the node agent's answer is malformed");
	body += 4;
	if (strncmp(response + 8, " 200", 4) != 0 && strstr(body, "<methodResponse") == NULL)
		fault("the node agent refused the request");
	if (write_all(1, body, (size_t)(m - (body - response))) < 0)
		return 1;
	return 0;
}
