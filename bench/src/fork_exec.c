/* fork_exec N: fork, execve /bin/true in the child, waitpid in the parent,
 * N/1000 times (the common micro-benchmark count; a process costs ~1000x a
 * system call). Under lwk the child's memory is copied at fork, its proxy
 * forks with it, and /bin/true starts under a fresh LWK image. */
#define _GNU_SOURCE
#include <sys/wait.h>
#include <unistd.h>
#include "syscall_loop.h"

static long spawn_true(void) {
    pid_t pid = fork();
    if (pid == 0) {
        char *argv[] = {"true", NULL};
        execv("/bin/true", argv);
        _exit(127);
    }
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) != pid) return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

int main(int argc, char **argv) {
    long n = iterations(argc, argv) / 1000 + 1, r;
    double ns;
    TIME_CALLS(n, spawn_true(), &ns, &r);
    report(ns, n, r);
    return r == 0 ? 0 : 3;
}
