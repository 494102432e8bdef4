/* spawn_exec N: posix_spawn /bin/true and waitpid, N/1000 times. glibc's
 * posix_spawn is clone(CLONE_VM|CLONE_VFORK): under lwk the child shares
 * the parent's memory until its execve, as natively, so nothing is copied;
 * its proxy still forks, and /bin/true starts under a fresh LWK image. */
#define _GNU_SOURCE
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>
#include "syscall_loop.h"

extern char **environ;

static long spawn_true(void) {
    char *argv[] = {"true", NULL};
    pid_t pid;
    if (posix_spawn(&pid, "/bin/true", NULL, NULL, argv, environ) != 0) return -1;
    int status = 0;
    if (waitpid(pid, &status, 0) != pid) return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

int main(int argc, char **argv) {
    long n = iterations(argc, argv) / 1000 + 1, r;
    double ns;
    TIME_CALLS(n, spawn_true(), &ns, &r);
    report(ns, n, r);
    return r == 0 ? 0 : 3;
}
