"""`python -m models.cpu_kernels`: build the kernels (or load the library named) and print
the library's path."""

from models.cpu_kernels import main

main()
