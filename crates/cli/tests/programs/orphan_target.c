/* A child that outlives its parent (tests/checkpoint.rs). The parent
 * forks, prints "ready", sleeps 600 ms (it is checkpointed meanwhile),
 * prints "parent done" and exits. The child waits for the end of the pipe
 * whose writing end only the parent holds, then 300 ms more, and prints
 * that it outlived its parent, with its parent's pid then (1 natively, or
 * a subreaper's) not being the old one. */
#include <stdio.h>
#include <unistd.h>

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    int p[2];
    if (pipe(p) != 0)
        return 1;
    pid_t parent = getpid();
    if (fork() == 0) {
        close(p[1]);
        char b;
        while (read(p[0], &b, 1) > 0) {
        }
        usleep(300000);
        printf("child outlived its parent: %s\n", getppid() != parent ? "reparented" : "same parent?");
        return 0;
    }
    close(p[0]);
    printf("ready\n");
    usleep(600000);
    printf("parent done\n");
    return 0;
}
