/* unsupported: calls that create processes, which the LWK does not
 * support yet. Each must fail with ENOSYS
 * (and the LWK must say which call on stderr), never hang or succeed
 * half-way. Prints one line per attempt. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

int main(void) {
    errno = 0;
    pid_t pid = fork();
    if (pid == 0) _exit(0);
    if (pid > 0) waitpid(pid, NULL, 0);
    printf("fork -> %d %s\n", (int)pid, pid < 0 ? strerrorname_np(errno) : "");
    return 0;
}
