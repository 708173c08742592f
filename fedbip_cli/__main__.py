from fedbip_cli.cli import main

main()
