/* mmap_file shared FILE: maps FILE MAP_SHARED, writes through the mapping,
 *   msyncs and unmaps; the caller checks the file afterwards.
 * mmap_file private FILE: maps FILE MAP_PRIVATE, writes through the
 *   mapping (the copy must change, the file must not). */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: mmap_file shared|private FILE\n"); return 2; }
    int shared = !strcmp(argv[1], "shared");
    int fd = open(argv[2], shared ? O_RDWR : O_RDONLY);
    if (fd < 0) { perror("open"); return 1; }
    struct stat st;
    if (fstat(fd, &st)) { perror("fstat"); return 1; }
    size_t len = st.st_size;
    char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, shared ? MAP_SHARED : MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) { perror("mmap"); return 1; }
    printf("before: %.16s\n", p);
    for (size_t i = 0; i < len; i += 4096) p[i] = 'A' + (i / 4096) % 26;
    memcpy(p + 1, "MAPPED", 6);
    printf("after: %.16s\n", p);
    if (shared) {
        if (msync(p, len, MS_SYNC)) { perror("msync"); return 1; }
        printf("msync ok\n");
    } else {
        /* The file, read with read(2), must not show the private writes. */
        char head[17] = {0};
        if (pread(fd, head, 16, 0) != 16) { perror("pread"); return 1; }
        printf("file still: %s\n", head);
    }
    if (munmap(p, len)) { perror("munmap"); return 1; }
    close(fd);
    printf("done\n");
    return 0;
}
