from winclip_cli.cli.app import main

main()
