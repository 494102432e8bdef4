/* signals MODE: a signal interrupts a delegated call that blocks.
 *   alarm-eintr:   SIGALRM (handler without SA_RESTART) during a read on an
 *                  empty pipe: read fails with EINTR after the handler ran.
 *   alarm-restart: the same with SA_RESTART: the handler runs, the read
 *                  goes on and gets the data a thread writes later.
 *   pselect:       SIGCHLD blocked, a child exits while pselect waits with
 *                  a mask that lets it through: EINTR, handler ran once. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/select.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t hits;
static void on_signal(int sig) { (void)sig; hits++; }
static int p[2];

static void *late_writer(void *arg) {
    usleep(600000); /* after the alarm */
    if (write(p[1], "late", 4) != 4) return NULL;
    return arg;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "";
    char buf[16] = {0};
    if (pipe(p)) return 1;
    if (!strncmp(mode, "alarm-", 6)) {
        struct sigaction sa = {0};
        sa.sa_handler = on_signal;
        sa.sa_flags = strcmp(mode, "alarm-restart") ? 0 : SA_RESTART;
        sigaction(SIGALRM, &sa, NULL);
        pthread_t t;
        if (sa.sa_flags) pthread_create(&t, NULL, late_writer, NULL);
        ualarm(200000, 0);
        ssize_t n = read(p[0], buf, sizeof buf - 1);
        printf("read -> %zd %s, handler ran %d time(s), data '%s'\n", n, n < 0 ? strerrorname_np(errno) : "", (int)hits, buf);
        return 0;
    }
    if (!strcmp(mode, "pselect")) {
        struct sigaction sa = {0};
        sa.sa_handler = on_signal;
        sigaction(SIGCHLD, &sa, NULL);
        sigset_t block, orig;
        sigemptyset(&block);
        sigaddset(&block, SIGCHLD);
        sigprocmask(SIG_BLOCK, &block, &orig);
        pid_t pid = fork();
        if (pid == 0) {
            usleep(100000);
            _exit(0);
        }
        fd_set r;
        FD_ZERO(&r);
        FD_SET(p[0], &r);
        int n = pselect(p[0] + 1, &r, NULL, NULL, NULL, &orig);
        printf("pselect -> %d %s, handler ran %d time(s)\n", n, n < 0 ? strerrorname_np(errno) : "", (int)hits);
        waitpid(pid, NULL, 0);
        return 0;
    }
    return 2;
}
