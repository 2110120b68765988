"""The servers mmgpt is compared with, and how to start and stop each one."""
