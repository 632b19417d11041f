"""Legacy devices as sans-I/O state machines (UART, i8042, RTC, port 0x80)."""
