from cis_lightning.cli import main

main()
