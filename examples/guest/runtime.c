#include "guest.h"

#define COM1 0x3F8
#define LINE_STATUS 5
#define TRANSMIT_EMPTY 0x20

static void put(char c) {
    while (!(inb(COM1 + LINE_STATUS) & TRANSMIT_EMPTY)) {
    }
    outb(COM1, (uint8_t)c);
}

void print(const char *text) {
    while (*text) {
        put(*text++);
    }
}

void print_hex(uint32_t value) {
    print("0x");
    for (int shift = 28; shift >= 0; shift -= 4) {
        put("0123456789abcdef"[(value >> shift) & 0xF]);
    }
}

void print_dec(uint32_t value) {
    char digits[12];
    int count = 0;
    do {
        digits[count++] = (char)('0' + value % 10);
        value /= 10;
    } while (value);
    while (count) {
        put(digits[--count]);
    }
}

int starts_with(const char *text, const char *prefix) {
    while (*prefix) {
        if (*text++ != *prefix++) {
            return 0;
        }
    }
    return 1;
}

uint32_t parse_number(const char *text) {
    uint32_t value = 0, base = 10;
    if (text[0] == '0' && text[1] == 'x') {
        base = 16;
        text += 2;
    }
    for (;; text++) {
        uint32_t digit;
        if (*text >= '0' && *text <= '9') {
            digit = (uint32_t)(*text - '0');
        } else if (base == 16 && *text >= 'a' && *text <= 'f') {
            digit = (uint32_t)(*text - 'a' + 10);
        } else {
            return value;
        }
        value = value * base + digit;
    }
}

uint32_t option(const char *cmdline, const char *key) {
    for (const char *word = cmdline; *word; word++) {
        if ((word == cmdline || word[-1] == ' ') && starts_with(word, key)) {
            const char *value = word;
            while (*value && *value != '=') {
                value++;
            }
            if (*value == '=') {
                return parse_number(value + 1);
            }
        }
    }
    return 0;
}

void kmain(uint32_t magic, struct multiboot_info *info) {
    int status;
    if (magic != 0x2BADB002) {
        print("not booted by multiboot\n");
        status = 0x7F;
    } else {
        const char *cmdline = (info->flags & 4) ? (const char *)info->cmdline : "";
        status = guest_main(info, cmdline);
    }
    outb(DEBUG_EXIT_PORT, (uint8_t)status);
    for (;;) {
        __asm__ volatile("cli; hlt");
    }
}
