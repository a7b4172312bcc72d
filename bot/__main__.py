"""`python -m bot` starts the Discord bot."""

from bot.cli.run import main

if __name__ == "__main__":
    main()
