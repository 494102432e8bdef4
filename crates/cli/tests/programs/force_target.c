/* A program with descriptors lwk cannot move (an inotify instance, a
 * memory file of its own), for `lwk migrate --force-close`
 * (tests/migrate.rs): prints "ready", waits three seconds (the migration
 * comes then), and says whether each descriptor is still open. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sys/mman.h>
#include <stdio.h>
#include <sys/inotify.h>
#include <time.h>
#include <unistd.h>

int main(void) {
    int fd = inotify_init1(IN_CLOEXEC);
    int mem = memfd_create("appmem", MFD_CLOEXEC);
    if (fd < 0 || mem < 0)
        return 2;
    printf("ready\n");
    fflush(stdout);
    for (int i = 0; i < 30; i++) {
        struct timespec ts = {0, 100000000};
        nanosleep(&ts, NULL);
    }
    printf("inotify %s\n", fcntl(fd, F_GETFD) < 0 ? "closed" : "open");
    printf("memfd %s\n", fcntl(mem, F_GETFD) < 0 ? "closed" : "open");
    return 0;
}
