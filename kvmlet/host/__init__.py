"""The host side of a machine: terminals, the console transcript, tap devices and supervised
host processes."""
