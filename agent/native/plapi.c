/*
 * plapi: call the node agent's slice API from inside a sliver.
 *
 *   plapi METHOD [ARG...]      e.g. `plapi GetRSpec`, `plapi ReservePort tcp:9000`
 *
 * Each ARG is sent as an XML-RPC int when it is a decimal number that fits, as a
 * string otherwise. The call is one HTTP/1.0 POST to the agent's socket inside the
 * sliver ($PLAPI_SOCKET, default /run/planetlab/agent.sock, the directory the agent
 * bind-mounts into every sliver); the agent knows the caller from SO_PEERCRED, never
 * from anything sent here. The answer's XML is written to standard output; exit 0 for
 * an answer, 1 for a fault or a failure (said on standard error).
 *
 * Static and dependency-free so that it runs in any image (a busybox root has no
 * Python); the agent bind-mounts it read-only at /usr/lib/planetlab/plapi.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
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
#define DEFAULT_SOCKET "/run/planetlab/agent.sock"

static void die(const char *what)
{
	fprintf(stderr, "plapi: %s\n", what);
	exit(1);
}

static char *req;
static size_t req_len;

static void put(const char *s, size_t n)
{
	if (req_len + n > MAX_REQUEST)
		die("the request is larger than 1 MiB");
	memcpy(req + req_len, s, n);
	req_len += n;
}

static void puts_(const char *s) { put(s, strlen(s)); }

/* `s` with the three characters XML cares about escaped. */
static void put_escaped(const char *s)
{
	for (; *s; s++) {
		if (*s == '<')
			puts_("&lt;");
		else if (*s == '>')
			puts_("&gt;");
		else if (*s == '&')
			puts_("&amp;");
		else
			put(s, 1);
	}
}

static int is_int(const char *s)
{
	const char *p = s + (*s == '-');
	if (!*p || strlen(p) > 10)
		return 0;
	for (; *p; p++)
		if (*p < '0' || *p > '9')
			return 0;
	long long v = atoll(s);
	return v >= INT_MIN && v <= INT_MAX;
}

static int valid_method(const char *s)
{
	if (!*s)
		return 0;
	for (; *s; s++)
		if (!((*s >= 'A' && *s <= 'Z') || (*s >= 'a' && *s <= 'z') ||
		      (*s >= '0' && *s <= '9') || *s == '_' || *s == '.'))
			return 0;
	return 1;
}

static void on_alarm(int sig)
{
	(void)sig;
	static const char msg[] = "plapi: no answer within 120 s\n";
	ssize_t ignored = write(2, msg, sizeof msg - 1);
	(void)ignored;
	_exit(1);
}

int main(int argc, char **argv)
{
	if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
		fprintf(stderr, "usage: plapi METHOD [ARG...]   (e.g. plapi GetRSpec; "
			"plapi Help lists the methods)\n");
		return argc < 2 ? 2 : 0;
	}
	if (!valid_method(argv[1]))
		die("the method name may hold letters, digits, '_' and '.' only");
	signal(SIGALRM, on_alarm);
	signal(SIGPIPE, SIG_IGN);
	alarm(TIMEOUT);

	req = malloc(MAX_REQUEST);
	if (!req)
		die("out of memory");
	puts_("<?xml version='1.0'?>\n<methodCall>\n<methodName>");
	puts_(argv[1]);
	puts_("</methodName>\n<params>\n");
	for (int i = 2; i < argc; i++) {
		puts_("<param><value>");
		puts_(is_int(argv[i]) ? "<int>" : "<string>");
		put_escaped(argv[i]);
		puts_(is_int(argv[i]) ? "</int>" : "</string>");
		puts_("</value></param>\n");
	}
	puts_("</params>\n</methodCall>\n");

	const char *path = getenv("PLAPI_SOCKET");
	if (!path || !*path)
		path = DEFAULT_SOCKET;
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof sa.sun_path)
		die("the socket path is too long");
	strcpy(sa.sun_path, path);
	int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s < 0 || connect(s, (struct sockaddr *)&sa, sizeof sa) < 0) {
		fprintf(stderr, "plapi: cannot reach the node agent at %s: %s\n", path,
			strerror(errno));
		return 1;
	}
	char head[128];
	int hl = snprintf(head, sizeof head, "POST / HTTP/1.0\r\nContent-Type: text/xml\r\n"
			  "Content-Length: %zu\r\n\r\n", req_len);
	if (write_all(s, head, (size_t)hl) < 0 || write_all(s, req, req_len) < 0)
		die("sending the request to the node agent failed");
	shutdown(s, SHUT_WR);

	size_t cap = 65536, len = 0;
	char *resp = malloc(cap + 1);
	if (!resp)
		die("out of memory");
	for (;;) {
		if (len == cap) {
			if (cap > MAX_RESPONSE)
				die("the answer is larger than 16 MiB");
			cap *= 2;
			resp = realloc(resp, cap + 1);
			if (!resp)
				die("out of memory");
		}
		ssize_t r = read(s, resp + len, cap - len);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			die("reading the answer failed");
		if (r == 0)
			break;
		len += (size_t)r;
	}
	resp[len] = 0;
	char *body = strstr(resp, "\r\n\r\n");
	if (!body || strncmp(resp, "HTTP/1.", 7) != 0)
		die("the node agent's answer is malformed");
	body += 4;
	if (write_all(1, body, len - (size_t)(body - resp)) < 0)
		return 1;
	if (strncmp(resp + 8, " 200", 4) != 0 || strstr(body, "<fault>") != NULL)
		return 1;
	return 0;
}
