from ryzanstein.cli import main

main()
