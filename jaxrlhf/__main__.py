from jaxrlhf.cli import main

main()
