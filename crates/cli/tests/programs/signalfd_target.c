/* Signalfds across a checkpoint and restore (tests/checkpoint.rs).
 *
 * Blocks SIGUSR1, SIGUSR2 and SIGTERM, and reads them from two signalfds
 * through an epoll loop: one for SIGUSR1 and SIGUSR2, one (non-blocking,
 * made for SIGHUP and changed to SIGTERM) for SIGTERM. It sends itself a
 * SIGUSR1 before "ready", which stays pending through a 1 s sleep, during
 * which it is checkpointed. Then it prints each signal it reads, and ends
 * after SIGTERM with "done" (or "timeout" after 10 s without a signal). */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <time.h>
#include <unistd.h>

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    sigset_t all, one;
    sigemptyset(&all);
    sigaddset(&all, SIGUSR1);
    sigaddset(&all, SIGUSR2);
    sigaddset(&all, SIGTERM);
    sigprocmask(SIG_BLOCK, &all, NULL);
    sigemptyset(&one);
    sigaddset(&one, SIGUSR1);
    sigaddset(&one, SIGUSR2);
    int sfd = signalfd(-1, &one, SFD_CLOEXEC);
    sigemptyset(&one);
    sigaddset(&one, SIGHUP);
    int sfd2 = signalfd(-1, &one, SFD_NONBLOCK);
    sigemptyset(&one);
    sigaddset(&one, SIGTERM);
    if (sfd < 0 || sfd2 < 0 || signalfd(sfd2, &one, 0) != sfd2) {
        perror("signalfd");
        return 1;
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = 1};
    epoll_ctl(ep, EPOLL_CTL_ADD, sfd, &ev);
    ev.data.u32 = 2;
    epoll_ctl(ep, EPOLL_CTL_ADD, sfd2, &ev);
    kill(getpid(), SIGUSR1);
    printf("ready\n");
    struct timespec second = {1, 0};
    nanosleep(&second, NULL);
    for (;;) {
        struct epoll_event got[2];
        int n = epoll_wait(ep, got, 2, 10000);
        if (n <= 0) {
            printf("timeout\n");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            struct signalfd_siginfo si;
            int fd = got[i].data.u32 == 1 ? sfd : sfd2;
            if (read(fd, &si, sizeof si) != sizeof si) {
                printf("short read\n");
                return 1;
            }
            printf("sfd%s %s\n", got[i].data.u32 == 1 ? "" : "2", sigabbrev_np(si.ssi_signo));
            if (si.ssi_signo == SIGTERM) {
                printf("done\n");
                return 0;
            }
        }
    }
}
