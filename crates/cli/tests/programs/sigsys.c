/* A SIGSYS sent to the program (not a trapped call): ignored, or the
 * process dies of it, as natively. */
#include <signal.h>
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc > 1) { signal(SIGSYS, SIG_IGN); kill(getpid(), SIGSYS); printf("ignored SIGSYS, still here\n"); return 0; }
    printf("before\n"); fflush(stdout);
    kill(getpid(), SIGSYS);
    printf("not reached\n");
    return 0;
}
