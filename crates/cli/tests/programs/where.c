/* Where do I run, and can I have N MiB? Prints the CPU of the main thread
 * and of a second thread, the CPUs allowed, then touches N MiB (argv[1])
 * and says whether it got them. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void *thread(void *arg) {
    (void)arg;
    printf("thread on cpu %d\n", sched_getcpu());
    return NULL;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("main on cpu %d\n", sched_getcpu());
    pthread_t t;
    pthread_create(&t, NULL, thread, NULL);
    pthread_join(t, NULL);
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "Cpus_allowed_list:", 18))
            printf("allowed %s", line + 19);
    fclose(f);
    size_t mb = argc > 1 ? strtoul(argv[1], NULL, 10) : 0;
    char *m = malloc(mb << 20);
    if (mb && !m) {
        printf("no memory for %zu MiB\n", mb);
        return 1;
    }
    memset(m, 1, mb << 20);
    printf("touched %zu MiB\n", mb);
    return 0;
}
