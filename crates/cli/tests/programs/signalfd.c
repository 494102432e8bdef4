/* signalfd: read, poll, epoll, a blocking read woken by another process's
 * kill, a handler interrupting a blocking read, and close. Prints what it
 * saw; the e2e test compares it with a native run. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_alarm(int sig) { (void)sig; }

static const char *err(long r) { return r < 0 ? strerror(errno) : "ok"; }

int main(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    sigaddset(&set, SIGUSR2);
    sigprocmask(SIG_BLOCK, &set, NULL);
    int fd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    printf("signalfd: %s\n", err(fd));
    struct signalfd_siginfo si;
    long n = read(fd, &si, sizeof si);
    printf("empty read: %ld %s\n", n, err(n));
    struct pollfd p = {fd, POLLIN, 0};
    printf("poll before kill: %d\n", poll(&p, 1, 0));
    kill(getpid(), SIGUSR1);
    p.revents = 0;
    int pr = poll(&p, 1, 1000);
    printf("poll after kill: %d revents %s\n", pr, (p.revents & POLLIN) ? "POLLIN" : "-");
    n = read(fd, &si, sizeof si);
    printf("read: %ld signo %s pid-is-me %d\n", n, strsignal(si.ssi_signo), si.ssi_pid == (unsigned)getpid());
    n = read(fd, &si, 10);
    printf("short read: %ld %s\n", n, err(n));
    p.revents = 0;
    printf("poll after read: %d\n", poll(&p, 1, 0));

    /* epoll, and a signal from another process while we wait. */
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = 7};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    pid_t parent = getpid();
    pid_t child = fork();
    if (child == 0) {
        usleep(50000);
        kill(parent, SIGUSR2);
        _exit(0);
    }
    struct epoll_event out;
    int en = epoll_wait(ep, &out, 1, 5000);
    printf("epoll_wait: %d data %u\n", en, en > 0 ? out.data.u32 : 0);
    n = read(fd, &si, sizeof si);
    printf("read: %ld signo %s from-child %d\n", n, strsignal(si.ssi_signo), si.ssi_pid == (unsigned)child);
    waitpid(child, NULL, 0);

    /* Blocking signalfd: a read waits for the signal. */
    int bfd = signalfd(-1, &set, 0);
    child = fork();
    if (child == 0) {
        usleep(50000);
        kill(parent, SIGUSR1);
        _exit(0);
    }
    n = read(bfd, &si, sizeof si);
    printf("blocking read: %ld signo %s\n", n, strsignal(si.ssi_signo));
    waitpid(child, NULL, 0);

    /* A handler without SA_RESTART interrupts a blocking read. */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sigaction(SIGALRM, &sa, NULL);
    alarm(1);
    n = read(bfd, &si, sizeof si);
    printf("interrupted read: %ld %s\n", n, err(n));

    /* Changing the mask of an existing signalfd; two signals in one read. */
    sigset_t only2;
    sigemptyset(&only2);
    sigaddset(&only2, SIGUSR2);
    printf("change mask: %s\n", signalfd(fd, &only2, 0) == fd ? "same fd" : "other");
    kill(getpid(), SIGUSR1);
    kill(getpid(), SIGUSR2);
    struct signalfd_siginfo two[2];
    n = read(fd, two, sizeof two);
    printf("read with USR2 only: %ld signo %s\n", n, strsignal(two[0].ssi_signo));
    n = read(bfd, two, sizeof two);
    printf("other fd gets USR1: %ld signo %s\n", n, strsignal(two[0].ssi_signo));
    n = signalfd(1, &set, 0);
    printf("signalfd on a non-signalfd: %ld %s\n", n, err(n));
    printf("close: %d\n", close(fd));
    n = read(fd, &si, sizeof si);
    printf("read after close: %ld %s\n", n, err(n));
    return 0;
}
