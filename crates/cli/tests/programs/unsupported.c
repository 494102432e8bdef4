/* unsupported: calls that create threads or processes or replace the
 * program, which the LWK does not support yet. Each must fail with ENOSYS
 * (and the LWK must say which call on stderr), never hang or succeed
 * half-way. Prints one line per attempt. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void *thread_main(void *arg) { return arg; }

int main(void) {
    pthread_t t;
    int rc = pthread_create(&t, NULL, thread_main, NULL);
    printf("pthread_create -> %s\n", rc ? strerrorname_np(rc) : "0");
    fflush(stdout);
    errno = 0;
    pid_t pid = fork();
    if (pid == 0) _exit(0);
    if (pid > 0) waitpid(pid, NULL, 0);
    printf("fork -> %d %s\n", (int)pid, pid < 0 ? strerrorname_np(errno) : "");
    fflush(stdout);
    char *argv[] = {"/bin/true", NULL};
    errno = 0;
    int r = execv("/bin/true", argv);
    printf("execv -> %d %s\n", r, strerrorname_np(errno));
    return 0;
}
