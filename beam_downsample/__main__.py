from beam_downsample.launch.entry import run

if __name__ == "__main__":
    run()
