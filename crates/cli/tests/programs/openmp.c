/* openmp: a parallel reduction on 4 threads (gcc -fopenmp). */
#include <omp.h>
#include <stdio.h>

int main(void) {
    long sum = 0;
    int threads = 0;
#pragma omp parallel num_threads(4) reduction(+ : sum)
    {
#pragma omp single
        threads = omp_get_num_threads();
#pragma omp for
        for (long i = 0; i < 20000000; i++) sum += i % 7;
    }
    printf("threads=%d sum=%ld\n", threads, sum);
    return 0;
}
