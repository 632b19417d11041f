/* The runtime of kvmlet's multiboot test guests: port and MMIO access, a polled serial
   console on COM1, the multiboot information structure. A guest defines guest_main; the
   runtime calls it in 32-bit protected mode and writes its return value to the debug-exit
   port (kvmlet then exits with status (value << 1) | 1). */
#ifndef KVMLET_GUEST_H
#define KVMLET_GUEST_H

#include <stdint.h>

#define DEBUG_EXIT_PORT 0x501

static inline void outb(uint16_t port, uint8_t value) {
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}
static inline void outw(uint16_t port, uint16_t value) {
    __asm__ volatile("outw %0, %1" : : "a"(value), "Nd"(port));
}
static inline void outl(uint16_t port, uint32_t value) {
    __asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port));
}
static inline uint8_t inb(uint16_t port) {
    uint8_t value;
    __asm__ volatile("inb %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}
static inline uint16_t inw(uint16_t port) {
    uint16_t value;
    __asm__ volatile("inw %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}
static inline uint32_t inl(uint16_t port) {
    uint32_t value;
    __asm__ volatile("inl %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}
static inline uint32_t mmio_read32(uint32_t address) {
    return *(volatile uint32_t *)address;
}
static inline void mmio_write32(uint32_t address, uint32_t value) {
    *(volatile uint32_t *)address = value;
}

struct multiboot_info {
    uint32_t flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr;
    uint32_t syms[4];
    uint32_t mmap_length, mmap_addr;
    uint32_t drives_length, drives_addr, config_table, boot_loader_name, apm_table;
} __attribute__((packed));

struct multiboot_module {
    uint32_t start, end, string, reserved;
} __attribute__((packed));

void print(const char *text);
void print_hex(uint32_t value);
void print_dec(uint32_t value);
int starts_with(const char *text, const char *prefix);
uint32_t parse_number(const char *text);
/* The value of "key=" in the command line (0 when absent). */
uint32_t option(const char *cmdline, const char *key);

int guest_main(struct multiboot_info *info, const char *cmdline);

#endif
