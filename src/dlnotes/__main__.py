from dlnotes.entry import main

main()
