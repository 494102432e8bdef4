/* Ends in the way argv[1] names: ret42, exit255, abort, segv. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    const char *how = argc > 1 ? argv[1] : "";
    printf("ending with %s\n", how);
    fflush(stdout);
    if (!strcmp(how, "ret42")) return 42;
    if (!strcmp(how, "exit255")) _exit(255);
    if (!strcmp(how, "abort")) abort();
    if (!strcmp(how, "segv")) { *(volatile int *)16 = 1; return 3; }
    fprintf(stderr, "unknown mode %s\n", how);
    return 2;
}
