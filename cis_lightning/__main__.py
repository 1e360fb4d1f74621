from cis_lightning.main import main

main()
