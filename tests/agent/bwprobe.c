/* Inside a sliver (static, no libc beyond what -static brings):
 *   bwprobe flood 4|6 DEST SECONDS   UDP, 1400-byte payloads, flat out (4 processes)
 *   bwprobe count 4|6 DEST N         N UDP packets, 2 ms apart
 *   bwprobe api SOCKET               stdin to the unix socket, its answer to stdout */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int udp(int v6, const char *dest, struct sockaddr_storage *sa, socklen_t *len) {
    memset(sa, 0, sizeof *sa);
    if (v6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)sa;
        a->sin6_family = AF_INET6; a->sin6_port = htons(9);
        if (inet_pton(AF_INET6, dest, &a->sin6_addr) != 1) return -1;
        *len = sizeof *a;
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)sa;
        a->sin_family = AF_INET; a->sin_port = htons(9);
        if (inet_pton(AF_INET, dest, &a->sin_addr) != 1) return -1;
        *len = sizeof *a;
    }
    return socket(v6 ? AF_INET6 : AF_INET, SOCK_DGRAM, 0);
}

int main(int argc, char **argv) {
    static char buf[65536];
    if (argc == 3 && !strcmp(argv[1], "api")) {
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        ssize_t n;
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        strncpy(sa.sun_path, argv[2], sizeof sa.sun_path - 1);
        if (s < 0 || connect(s, (struct sockaddr *)&sa, sizeof sa) < 0) { perror("connect"); return 1; }
        while ((n = read(0, buf, sizeof buf)) > 0) write(s, buf, n);
        shutdown(s, SHUT_WR);
        while ((n = read(s, buf, sizeof buf)) > 0) write(1, buf, n);
        return 0;
    }
    if (argc != 5) return 2;
    struct sockaddr_storage sa;
    socklen_t len;
    int s = udp(argv[2][0] == '6', argv[3], &sa, &len);
    if (s < 0) { perror("socket"); return 1; }
    if (!strcmp(argv[1], "flood")) {
        /* Four senders: the class stays backlogged even when the node is so loaded
         * that one sender waits longer than the 30 ms its queue lasts. */
        double end = now() + atof(argv[4]);
        for (int i = 0; i < 3; i++)
            if (fork() == 0) break;
        while (now() < end)
            sendto(s, buf, 1400, 0, (struct sockaddr *)&sa, len);
        while (wait(NULL) > 0) {}
        return 0;
    }
    for (int i = 0; i < atoi(argv[4]); i++) {
        if (sendto(s, buf, 1400, 0, (struct sockaddr *)&sa, len) != 1400) { perror("sendto"); return 1; }
        usleep(2000);
    }
    return 0;
}
