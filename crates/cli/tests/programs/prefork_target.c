// A pre-forked server: the parent listens on 127.0.0.1:PORT and forks two
// workers, which share the listener and each answer connections, one line
// each ("worker: LINE"); a line "quit" ends the worker that gets it. The
// parent prints "ready" once both exist, and "workers done" when it has
// reaped both (with their exit status 0).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static void serve(int l) {
    for (;;) {
        int c = accept(l, NULL, NULL);
        if (c < 0) _exit(90);
        char line[256];
        ssize_t n = read(c, line, sizeof line - 1);
        if (n <= 0) { close(c); continue; }
        line[n] = 0;
        char out[300];
        int len = snprintf(out, sizeof out, "worker: %s", line);
        if (write(c, out, len) != len) _exit(91);
        close(c);
        if (strcmp(line, "quit\n") == 0) _exit(0);
    }
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 7402;
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 16)) return 2;
    pid_t w[2];
    for (int i = 0; i < 2; i++) {
        w[i] = fork();
        if (w[i] < 0) return 3;
        if (w[i] == 0) serve(l);
    }
    close(l);
    printf("ready\n");
    int ok = 0;
    for (int i = 0; i < 2; i++) {
        int status = 0;
        if (waitpid(w[i], &status, 0) == w[i] && WIFEXITED(status) && WEXITSTATUS(status) == 0) ok++;
    }
    printf("workers done: %d of 2\n", ok);
    return 0;
}
