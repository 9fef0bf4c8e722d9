"""`make bench`: runs every benchmark in turn."""

from bench import learning_loop

if __name__ == "__main__":
    learning_loop.main()
