/* A model of the key table's lookup at 1M keys, for the README's "Why the 1M auth decision
 * stays two misses long" and "What 400 ns at 1M would take": the memory reads of several
 * layouts, without the rest of the table.
 *
 *   gcc -O2 -o /tmp/lookup-model benches/lookup-model.c
 *   /tmp/lookup-model LAYOUT [WORK [TIMED]]
 *
 * LAYOUT 0: as `keys::table` is: an index slot (tag, owner number, slot number) at the
 *           hash's home, then the entry's cell and the owner's name, read together.
 * LAYOUT 1: the same without the owner's name.
 * LAYOUT 2: cells stored at their hash positions and probed directly (no index); the
 *           owner's name read from the cell's owner number, after the cell.
 * LAYOUT 3: as 2, without the owner's name (what a cell holding the name inline costs).
 * LAYOUT 4: the slab written in hash order, with a rank directory over it (16 bytes per 32
 *           buckets of the hash space, a bucket per key: a base slot and 2-bit counts) that
 *           names the cell a key is in, or the one before it; that cell and the next are read
 *           beside the index slot, which still decides. No owner's name (as 1).
 * LAYOUT 5: as 0, but the index slot's place known before the HMAC (from a locator: a keyed
 *           hash of the presented key, cheap beside the HMAC, that the record would store),
 *           so its read starts before WORK and overlaps it.
 * LAYOUT 6: as 3 (cells at their hash positions, no owner's name), the cell's read started
 *           before WORK the same way: a locator and cells holding the name, together.
 * LAYOUT 7, 8: as 5 and 6, with a plain load whose value is used after WORK in place of the
 *           prefetch instruction (what Rust without `unsafe` can write: the load overlaps only
 *           as much of WORK as the CPU's reorder window holds).
 * WORK:     rounds of integer hashing between lookups (the HMAC's place; 0: none, so the
 *           CPU overlaps one lookup's reads with the next one's).
 * TIMED:    1 times WORK with the lookup (what a decision pays; needed to see 5 and 6 gain),
 *           0 (the default) the lookup alone.
 *
 * Sizes as the table's: 88-byte cells on huge pages, 8-byte index slots at 80 % load,
 * 100,000 owners of 32 bytes (an interned `Name` in its `OnceLock`) on the allocator's pages,
 * 65,536 probe keys out of 1,000,000, as `examples/scale.rs --auth-only` probes. Prints the
 * p50 and p90 of 400,000 lookups timed one by one (the clock's own ~20 ns included). */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define KEYS 1000000
#define OWNERS 100000
#define PROBES 65536
#define ROUNDS 400000
#define HUGE (2UL << 20)

typedef struct { uint64_t w[11]; } cell_t; /* w[0]: hash, w[8]: owner, w[10]: written */
typedef struct { char b[32]; } owner_t;
typedef struct { uint32_t base, pad; uint64_t counts; } group_t;

static void *huge_pages(size_t bytes) {
    size_t len = (bytes + HUGE - 1) & ~(HUGE - 1);
    char *p = mmap(0, len + HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) { perror("mmap"); exit(1); }
    char *a = (char *)(((uintptr_t)p + HUGE - 1) & ~(HUGE - 1));
    madvise(a, len, MADV_HUGEPAGE);
    memset(a, 0, bytes);
    return a;
}

static uint64_t mix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ULL + (uint64_t)t.tv_nsec;
}

static int by_value(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static size_t home(uint64_t h, size_t cap) { return (size_t)(((unsigned __int128)h * cap) >> 64); }

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: %s LAYOUT(0-8) [WORK [TIMED]]\n", argv[0]); return 2; }
    int layout = atoi(argv[1]), work = argc > 2 ? atoi(argv[2]) : 0;
    int timed = argc > 3 ? atoi(argv[3]) : 0;
    /* 5 to 8 are 0 and 3 with their first read started before the work: 1 a prefetch, 2 a
     * load. */
    int shown = layout, early = layout >= 7 ? 2 : layout >= 5;
    if (layout == 5 || layout == 7) layout = 0;
    if (layout == 6 || layout == 8) layout = 3;
    size_t cap = KEYS + KEYS / 4;
    owner_t *owners = malloc(OWNERS * sizeof(owner_t));
    for (int i = 0; i < OWNERS; i++) memset(owners[i].b, 'a' + i % 26, sizeof owners[i].b);
    cell_t *slab = huge_pages(KEYS * sizeof(cell_t));
    uint64_t *index = huge_pages(cap * 8);
    cell_t *homes = huge_pages(cap * sizeof(cell_t));
    uint64_t *hashes = malloc(KEYS * 8);
    for (int i = 0; i < KEYS; i++) {
        uint64_t h = mix(i) | 1;
        hashes[i] = h;
        slab[i].w[0] = h, slab[i].w[8] = i % OWNERS, slab[i].w[10] = 1ULL << 63;
        size_t at = home(h, cap);
        while (index[at]) at = at + 1 == cap ? 0 : at + 1;
        index[at] = ((h & 0xff) << 56) | ((uint64_t)(i % OWNERS) << 32) | (uint64_t)(i + 2);
        at = home(h, cap);
        while (homes[at].w[10]) at = at + 1 == cap ? 0 : at + 1;
        homes[at] = slab[i];
    }
    group_t *groups = 0;
    if (layout == 4) {
        /* The slab and the index rewritten in hash order, then the directory over it. */
        uint64_t *sorted = malloc(KEYS * 16);
        for (int i = 0; i < KEYS; i++) sorted[2 * i] = hashes[i], sorted[2 * i + 1] = i;
        qsort(sorted, KEYS, 16, by_value);
        memset(index, 0, cap * 8);
        for (int i = 0; i < KEYS; i++) {
            uint64_t h = sorted[2 * i], o = sorted[2 * i + 1] % OWNERS;
            slab[i].w[0] = h, slab[i].w[8] = o, slab[i].w[10] = 1ULL << 63;
            size_t at = home(h, cap);
            while (index[at]) at = at + 1 == cap ? 0 : at + 1;
            index[at] = ((h & 0xff) << 56) | (o << 32) | (uint64_t)(i + 2);
        }
        size_t ngroups = KEYS / 32 + 1, i = 0;
        groups = huge_pages(ngroups * sizeof(group_t));
        for (size_t g = 0; g < ngroups; g++) {
            groups[g].base = i;
            for (int k = 0; k < 32; k++) {
                size_t c = 0;
                while (i < KEYS && home(slab[i].w[0], KEYS) == g * 32 + k) i++, c++;
                groups[g].counts |= (uint64_t)(c > 3 ? 3 : c) << (2 * k);
            }
        }
    }
    uint64_t *probes = malloc(PROBES * 8);
    for (int i = 0; i < PROBES; i++) probes[i] = hashes[mix(i + 77) % KEYS];
    uint64_t *took = malloc(ROUNDS * 8);
    memset(took, 1, ROUNDS * 8);
    volatile uint64_t sink = 0;
    for (int r = 0; r < ROUNDS; r++) {
        uint64_t h = probes[r % PROBES], x = h, got = 0;
        uint64_t t0 = timed ? now_ns() : 0;
        size_t at = home(h, cap);
        uint64_t loaded = 0;
        if (early == 1) {
            __builtin_prefetch(layout == 0 ? (void *)&index[at] : (void *)&homes[at]);
            if (layout == 3) __builtin_prefetch((char *)&homes[at] + 64);
        } else if (early == 2) {
            loaded = layout == 0 ? index[at] : homes[at].w[0] + homes[at].w[10];
        }
        for (int k = 0; k < work; k++) x = mix(x);
        sink += x + (loaded & 1);
        if (!timed) t0 = now_ns();
        if (layout == 4) {
            size_t b = home(h, KEYS);
            group_t g = groups[b / 32];
            uint64_t below = b % 32 ? g.counts & (~0ULL >> (64 - 2 * (b % 32))) : 0;
            uint32_t p = g.base + __builtin_popcountll(below & 0x5555555555555555ULL)
                       + 2 * __builtin_popcountll(below & 0xAAAAAAAAAAAAAAAAULL);
            /* The named cell and the next, first and last words: read now, values kept. */
            uint64_t early = slab[p].w[0] + slab[p].w[10];
            if (p + 1 < KEYS) early += slab[p + 1].w[10];
            sink += early;
        }
        if (layout < 2 || layout == 4) {
            for (;; at = at + 1 == cap ? 0 : at + 1) {
                uint64_t s = index[at];
                if ((s >> 56) != (h & 0xff)) continue;
                if (layout == 0) got += owners[(s >> 32) & 0xffffff].b[0];
                cell_t *c = &slab[(uint32_t)s - 2];
                if (c->w[0] == h) { got += c->w[3] + c->w[10]; break; }
            }
        } else {
            for (;; at = at + 1 == cap ? 0 : at + 1) {
                cell_t *c = &homes[at];
                if (c->w[0] != h) continue;
                got += c->w[3] + c->w[10];
                if (layout == 2) got += owners[c->w[8]].b[5];
                break;
            }
        }
        sink += got;
        took[r] = now_ns() - t0;
    }
    qsort(took, ROUNDS, 8, by_value);
    printf("layout %d work %d%s: p50 %lu ns, p90 %lu ns\n", shown, work,
           timed ? " (timed with the work)" : "",
           (unsigned long)took[ROUNDS / 2], (unsigned long)took[ROUNDS * 9 / 10]);
    return 0;
}
