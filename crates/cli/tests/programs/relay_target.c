/* A program that is migrated while it talks through its standard streams
 * (tests/migrate.rs): the `lwk run` that started it must keep standing for
 * it. Prints "ready", then for each line of standard input prints
 * "echo: LINE" on standard output and "err: LINE" on standard error; "exit
 * N" ends it with status N; SIGUSR1 prints "usr1"; SIGTERM has its default
 * action. At the end of its input it prints "eof", waits for a signal,
 * and after SIGUSR1 exits 3. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t usr1;

static void on_usr1(int sig) {
    (void)sig;
    usr1 = 1;
    static const char m[] = "usr1\n";
    if (write(1, m, sizeof m - 1) < 0)
        _exit(9);
}

int main(void) {
    struct sigaction sa = {0};
    sa.sa_handler = on_usr1; /* no SA_RESTART: the read returns EINTR */
    sigaction(SIGUSR1, &sa, NULL);
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    char line[256];
    for (;;) {
        if (!fgets(line, sizeof line, stdin)) {
            if (usr1 && ferror(stdin)) {
                clearerr(stdin);
                usr1 = 0;
                continue;
            }
            printf("eof\n");
            usr1 = 0;
            while (!usr1)
                pause();
            return 3;
        }
        line[strcspn(line, "\n")] = 0;
        if (strncmp(line, "exit ", 5) == 0) {
            printf("bye\n");
            return atoi(line + 5);
        }
        printf("echo: %s\n", line);
        fprintf(stderr, "err: %s\n", line);
    }
}
