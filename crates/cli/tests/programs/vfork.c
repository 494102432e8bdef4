/* vfork and posix_spawn: the child shares the parent's memory until it
 * execs or exits, as natively; the parent's stack survives the child. */
#include <pthread.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;
static volatile int spin = 1;

static void *busy(void *arg) {
    (void)arg;
    unsigned long n = 0;
    while (spin)
        n++;
    return (void *)n;
}

/* Deep enough that the child's calls reuse the parent's stack. */
static int run(const char *path, char *const argv[], volatile int *shared) {
    char local[512];
    memset(local, 'p', sizeof local);
    pid_t p = vfork();
    if (p == 0) {
        char scratch[2048];
        memset(scratch, 'c', sizeof scratch);
        *shared = scratch[100];
        execv(path, argv);
        *shared = -1;
        _exit(127);
    }
    int st;
    waitpid(p, &st, 0);
    for (size_t i = 0; i < sizeof local; i++)
        if (local[i] != 'p')
            return -100;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    volatile int shared = 0;
    pid_t p = vfork();
    if (p == 0) {
        shared = 42;
        _exit(7);
    }
    int st;
    waitpid(p, &st, 0);
    printf("vfork+_exit: status %d, child's write seen: %d\n", WEXITSTATUS(st), shared);

    char *echo[] = {"echo", "exec from vfork", NULL};
    int r = run("/bin/echo", echo, &shared);
    printf("vfork+exec: status %d, shared %c\n", r, shared);
    char *bad[] = {"nope", NULL};
    r = run("/nonexistent/nope", bad, &shared);
    printf("vfork+failed exec: status %d, shared %d\n", r, shared);

    pthread_t t;
    pthread_create(&t, NULL, busy, NULL);
    for (int i = 0; i < 20; i++) {
        char *tr[] = {"true", NULL};
        if ((r = run("/bin/true", tr, &shared)) != 0)
            printf("vfork %d with a busy thread: status %d\n", i, r);
    }
    spin = 0;
    pthread_join(t, NULL);
    printf("20 vforks beside a busy thread done\n");

    char *sh[] = {"sh", "-c", "echo posix_spawn $0 $1", "a", "b", NULL};
    r = posix_spawn(&p, "/bin/sh", NULL, NULL, sh, environ);
    waitpid(p, &st, 0);
    printf("posix_spawn: %d status %d\n", r, WEXITSTATUS(st));
    return 0;
}
