"""`make bench`: runs every benchmark in turn."""

from bench import api_listing, learning_loop

if __name__ == "__main__":
    api_listing.main([])
    learning_loop.main()
