/* Firmware example (one input, one output): run the generated PFP library once on the input in input_data.h and print
 * the predictive mean and variance of every output over semihosting (QEMU prints it).
 * Startup code and linker script come with the generated library (OUT/firmware/, for Cortex-M targets). */
#include <stdio.h>

#include "pfp_model.h"
#include "input_data.h" /* const float pfp_example_input[PFP_MODEL_INPUT0_SIZE] */

static float mean[PFP_MODEL_OUTPUT0_SIZE];
static float var[PFP_MODEL_OUTPUT0_SIZE];

int main(int argc, char** argv) {
  int i;
  (void)argc; /* pfpc's startup passes the semihosting command line; unused here */
  (void)argv;
  pfp_model_run(pfp_example_input, mean, var, NULL);
  for (i = 0; i < PFP_MODEL_OUTPUT0_SIZE; ++i) {
    printf("%d mean %.9g var %.9g\n", i, (double)mean[i], (double)var[i]);
  }
  return 0;
}
