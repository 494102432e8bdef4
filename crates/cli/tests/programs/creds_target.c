/* A program that keeps its credentials across a checkpoint and restore
 * (tests/checkpoint.rs), run as an ordinary user: it prints its user and
 * group ids and supplementary groups, "ready", waits a little (the
 * checkpoint comes then), prints them again, those a second thread has
 * (a kernel task's credentials are its own), and whether it may open a
 * file only root may read. A restore, which runs as root, must give it
 * back its own rights, not root's. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void ids(const char *who) {
    uid_t r, e, s;
    gid_t gr, ge, gs, groups[64];
    getresuid(&r, &e, &s);
    getresgid(&gr, &ge, &gs);
    int n = getgroups(64, groups);
    printf("%s: uid %u %u %u gid %u %u %u groups %d\n", who, r, e, s, gr, ge, gs, n);
}

static void *second(void *arg) {
    (void)arg;
    struct timespec ts = {1, 600000000};
    nanosleep(&ts, NULL);
    ids("thread");
    return NULL;
}

int main(void) {
    ids("main");
    pthread_t t;
    pthread_create(&t, NULL, second, NULL);
    printf("ready\n");
    fflush(stdout);
    for (int i = 0; i < 15; i++) {
        struct timespec ts = {0, 100000000};
        nanosleep(&ts, NULL);
    }
    ids("main");
    pthread_join(t, NULL);
    int fd = open("/etc/shadow", O_RDONLY);
    printf("shadow: %s\n", fd >= 0 ? "opened" : strerror(errno));
    return 0;
}
