/* A small TCP and UDP server that is checkpointed while a client is
 * connected, and restored (tests/checkpoint.rs). Arguments: ADDRESS
 * TCP_PORT UDP_PORT [ACCEPT_DELAY_MS]. It listens on TCP, accepts one
 * connection (after ACCEPT_DELAY_MS, if given: until then a client waits
 * in the accept queue) and then
 * answers it line by line: "udp" reports the datagrams waiting on its UDP
 * socket (count, then each with its source port's parity and its bytes),
 * "quit" says "bye" and ends, anything else is echoed. Prints "ready" once
 * it listens and "connected" once it accepted. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 4 && argc != 5)
        return 2;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &a.sin_addr);
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 8))
        return 3;
    struct sockaddr_in u = a;
    u.sin_port = htons(atoi(argv[3]));
    int us = socket(AF_INET, SOCK_DGRAM, 0);
    if (bind(us, (struct sockaddr *)&u, sizeof u))
        return 4;
    printf("ready\n");
    fflush(stdout);
    if (argc == 5)
        usleep(atoi(argv[4]) * 1000);
    int c = accept(l, NULL, NULL);
    if (c < 0)
        return 5;
    printf("connected\n");
    fflush(stdout);
    FILE *in = fdopen(c, "r");
    char line[4096];
    while (fgets(line, sizeof line, in)) {
        char out[8192];
        int n;
        if (strcmp(line, "quit\n") == 0) {
            write(c, "bye\n", 4);
            break;
        } else if (strcmp(line, "udp\n") == 0) {
            char all[4096] = "";
            int count = 0;
            char d[512];
            struct sockaddr_in from;
            socklen_t fl = sizeof from;
            ssize_t r;
            while ((r = recvfrom(us, d, sizeof d - 1, MSG_DONTWAIT, (struct sockaddr *)&from, &fl)) >= 0) {
                d[r] = 0;
                count++;
                snprintf(all + strlen(all), sizeof all - strlen(all), " %s:%s", inet_ntoa(from.sin_addr), d);
                fl = sizeof from;
            }
            n = snprintf(out, sizeof out, "udp %d%s\n", count, all);
        } else {
            n = snprintf(out, sizeof out, "%s", line);
        }
        if (write(c, out, n) != n)
            return 6;
    }
    printf("done\n");
    return 0;
}
