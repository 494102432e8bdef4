/* Sums the whitespace-separated integers on stdin. */
#include <stdio.h>

int main(void) {
    long long x, sum = 0, count = 0;
    while (scanf("%lld", &x) == 1) { sum += x; count++; }
    printf("count=%lld sum=%lld\n", count, sum);
    return 0;
}
